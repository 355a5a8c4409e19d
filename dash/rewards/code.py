"""Code-execution reward: run the completion's Python against the row's tests in a sandboxed subprocess.

Purpose: the paper's coding setting (MBPP+). The completion's program (its last ```python block, else its last
untagged ``` block, else the whole text) is run with the row's tests; reward = 1.0 if all pass (`mode="all"`, the
pass@1 notion) or the fraction that passed (`mode="fraction"`). Tests (`parse_code_tests`): a JSON list of Python
snippets (e.g. MBPP `assert` lines), a JSON object {"tests" | "test_list" | "test": ..., "setup" | "test_imports":
...}, or any other text taken as one test script. Each test runs after the program, in its globals.

The sandbox, per call: a fresh scratch dir (cwd, HOME, TMPDIR; deleted afterwards), `python -I -B` with a scrubbed
env, own session and process group (SIGKILLed as a group on the wall-clock timeout), and inside the child before the
program runs: RLIMIT_CPU (SIGKILL at the limit), RLIMIT_AS (memory), RLIMIT_FSIZE, no core dumps, stdin/stdout/stderr
on /dev/null. Two isolation levels; `isolation="auto"` takes the strongest that works (probed once per process):
- `namespace` (needs util-linux `unshare` and unprivileged user namespaces): new user, network, PID and mount
  namespaces. PREVENTED by the kernel: any network (only a down loopback exists); seeing or signalling the trainer
  (other PIDs are invisible, `os.getppid()` is 0); writing any file outside the scratch dir (every mount is remounted
  read-only, then a nested user namespace removes the right to remount); opening device nodes other than null, zero,
  random, urandom (nodev); reaching unix sockets under /run (hidden by an empty tmpfs); outliving the call (every
  process dies with the namespace's init). NOT prevented: reading files the trainer's user can read; connecting to
  unix sockets outside /run that the user may write to (the guard refuses sockets, bypassably); spending its CPU /
  memory budget; forking up to the timeout (RLIMIT_NPROC counts per real user across the machine, so setting it
  would break other jobs). If the trainer runs as root, permission checks on what stays reachable (reads, sockets) are root's.
- `basic` (fallback): the limits above plus the guard below, nothing else. A program that gets past the guard can use
  the network, signal the trainer (same user) and write the trainer's files.
`guard=True` (both levels) installs a CPython audit hook before the program runs. It refuses sockets and DNS, kill,
fork, exec, spawn, subprocess and prlimit, writes/renames/deletes outside the scratch dir, and importing ctypes. It is
best effort, since C code paths without audit events get past it: in `basic` mode it is the only barrier, in
`namespace` mode a second one.

Score integrity is NOT guaranteed against a deliberately adversarial program: pass marks are written by the harness
in the same process (with a per-call nonce that the program is not given), so a program that walks the interpreter's
frames, or returns objects whose `__eq__` is always True, can fake passes. The sandbox protects the trainer, not the
score. Pass the completion decoded without special tokens.

Departures from the paper: the paper's MBPP+ checker is not in its released code; limits here are our choice.
Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

_UNSHARE_ARGS = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc")
_RESULT_CAP_BYTES = 1 << 20  # pass marks are ~20 bytes per test; a program spamming the channel only hurts itself
_LOCKDOWN_FAILED = 3  # harness exit code when the namespace lockdown could not be completed
_warned_basic = False  # log the fallback to basic isolation once, not per call


@dataclass(frozen=True, kw_only=True, slots=True)
class CodeRewardConfig:
    """Limits and scoring of the code reward."""

    timeout_s: float = 5.0
    """Wall-clock limit per completion (all its tests); the process group is SIGKILLed after it."""
    cpu_time_s: int = 4
    """RLIMIT_CPU of the program, seconds of CPU."""
    memory_mb: int = 1024
    """RLIMIT_AS of the program (address space, so a bit above the real memory it may use)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write (in the scratch dir)."""
    mode: Literal["all", "fraction"] = "all"
    """Reward 1.0 only if every test passes, or the fraction of tests that passed."""
    isolation: Literal["auto", "namespace", "basic"] = "auto"
    """`auto`: namespaces if they work here, else basic (logged once). `namespace` raises if unavailable."""
    guard: bool = True
    """Install the in-process audit-hook guard before the program runs."""

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and self.cpu_time_s > 0 and self.memory_mb > 0 and self.max_file_mb > 0):
            raise ValueError(f"CodeRewardConfig limits must be > 0, got {self}")
        if self.mode not in ("all", "fraction") or self.isolation not in ("auto", "namespace", "basic"):
            raise ValueError(f"CodeRewardConfig: bad mode/isolation in {self}")


@dataclass(frozen=True, slots=True)
class CodeTests:
    """The tests of one row. Attributes: tests: snippets run one by one; setup: code run before the program."""

    tests: tuple[str, ...]
    setup: str = ""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What one run did. Attributes: passed: one flag per test; timed_out; isolation used; returncode; seconds."""

    passed: tuple[bool, ...]
    timed_out: bool
    isolation: str
    returncode: int | None
    seconds: float


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start or lock down); not a verdict on the program."""


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The program in a completion: last ```python block, else last untagged block, else the whole text.

    An unclosed final fence (generation cut at the length limit) counts as a block up to the end of the text.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    for wanted in (("python", "py", "python3"), ("",)):
        bodies = [body for lang, body in blocks if lang in wanted]
        if bodies:
            return bodies[-1]
    return completion


def parse_code_tests(answer: object) -> CodeTests | None:
    """The tests of a row from its answer field (see the module docstring), or None if there are none."""
    data = answer
    if isinstance(answer, str):
        try:
            data = json.loads(answer)
        except ValueError:
            return CodeTests(tests=(answer,)) if answer.strip() else None
    setup = ""
    if isinstance(data, dict):
        setup_part = data.get("setup", data.get("test_imports", ""))
        setup = "\n".join(setup_part) if isinstance(setup_part, list) else str(setup_part or "")
        data = data.get("tests", data.get("test_list", data.get("test")))
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        return None
    tests = tuple(t for t in data if t.strip())
    return CodeTests(tests=tests, setup=setup) if tests else None


# The program inside the sandbox. Runs as `python -I -B -c`; reads its job from `_job.json` in the scratch dir and
# deletes it (with it the nonce) before any untrusted code runs. Callables are bound locally first so a program that
# patches builtins or `os` cannot change how tests are run or reported.
_HARNESS = r"""
import json, os, re, resource, sys
def _lockdown(scratch):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    keep = {"noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}  # flags the kernel locks
    def mount(src, target, fstype, flags, data=None):
        if libc.mount(src, target.encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), "mount " + target)
    mount(scratch.encode(), scratch, None, 4096)  # MS_BIND: the scratch dir becomes its own, writable mount
    os.chdir(scratch)  # the old cwd still points into the parent mount, which is about to become read-only
    if os.path.isdir("/run"):  # hide the host's unix sockets (docker, dbus, ...) under an empty tmpfs
        mount(b"tmpfs", "/run", b"tmpfs", 2 | 4 | 8, b"size=64k")
    harmless = [d for d in ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom") if os.path.exists(d)]
    for dev in harmless:  # own mounts, so that they stay usable when every other device node is disabled
        mount(dev.encode(), dev, None, 4096)
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        if target != scratch:  # MS_REMOUNT|MS_BIND|MS_RDONLY|MS_NOSUID (+ MS_NODEV): read-only, no disks etc.
            flags = 32 | 4096 | 1 | 2 | (0 if target in harmless else 4)
            mount(None, target, None, flags | sum(keep.get(o, 0) for o in fields[5].split(",")))
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER: no capability over these mounts any more
        raise OSError(ctypes.get_errno(), "unshare")
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
def _guard(scratch):
    root, realpath, fspath = os.path.realpath(scratch) + os.sep, os.path.realpath, os.fspath
    deny = {"os.kill", "os.killpg", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "subprocess.Popen", "resource.prlimit", "socket.__new__", "socket.getaddrinfo", "ctypes.dlopen"}
    paths = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
             "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2}
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def inside(p):
        try:
            return isinstance(p, int) or (realpath(fspath(p)) + os.sep).startswith(root)
        except Exception:
            return False
    def hook(event, args):
        bad = event in deny
        if event == "open":
            mode, flags = args[1], args[2] or 0
            bad = ((isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & writes) and not inside(args[0])
        elif event in paths:
            bad = not all(inside(p) for p in args[: paths[event]])
        elif event == "import":
            bad = args[0].split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess")
        if bad:
            raise PermissionError("sandbox: " + event + " is not allowed")
    sys.addaudithook(hook)
def _main():
    scratch, run, compile_, write = os.getcwd(), exec, compile, os.write
    with open("_job.json") as f:
        job = json.load(f)
    os.remove("_job.json")
    null = os.open(os.devnull, os.O_RDWR)
    if job["lockdown"]:
        try:
            _lockdown(scratch)
        except Exception:
            os._exit(LOCKDOWN_FAILED)
    for res, soft, hard in job["limits"]:
        resource.setrlimit(getattr(resource, res), (soft, hard))
    out = os.dup(1)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    nonce = job.pop("nonce")
    write(out, (nonce + " ready\n").encode())
    if job["guard"]:
        _guard(scratch)
    env = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        run(compile_(job["setup"], "setup.py", "exec"), env)
        run(compile_(job["code"], "solution.py", "exec"), env)
    except BaseException:
        return
    for i, test in enumerate(job["tests"]):
        try:
            run(compile_(test, "test_%d.py" % i, "exec"), env)
            write(out, ("%s %d pass\n" % (nonce, i)).encode())
        except BaseException:
            pass
_main()
""".replace("LOCKDOWN_FAILED", str(_LOCKDOWN_FAILED))


def _limits(cfg: CodeRewardConfig) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    return [
        # soft == hard: the kernel then sends SIGKILL at the limit. A lower soft limit would send SIGXCPU first,
        # which the namespace's init (our harness, PID 1 there) ignores by default, so the limit would be late.
        ("RLIMIT_CPU", cfg.cpu_time_s, cfg.cpu_time_s),
        ("RLIMIT_AS", cfg.memory_mb * mb, cfg.memory_mb * mb),
        ("RLIMIT_FSIZE", cfg.max_file_mb * mb, cfg.max_file_mb * mb),
        ("RLIMIT_CORE", 0, 0),
    ]


def _spawn(argv: list[str], scratch: str) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})  # shared CPUs
    return subprocess.Popen(
        argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip


def _run(code: str, tests: CodeTests, cfg: CodeRewardConfig, isolation: str) -> SandboxResult:
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="dash-code-"))
    nonce, start, proc, timed_out = secrets.token_hex(16), time.monotonic(), None, False
    job = {"nonce": nonce, "lockdown": isolation == "namespace", "guard": cfg.guard, "limits": _limits(cfg),
           "setup": tests.setup, "code": code, "tests": list(tests.tests)}  # fmt: skip
    with open(os.path.join(scratch, "_job.json"), "w") as f:
        json.dump(job, f)
    argv = [sys.executable, "-I", "-B", "-c", _HARNESS]
    if isolation == "namespace":
        argv = [shutil.which("unshare") or "unshare", *_UNSHARE_ARGS, *argv]
    try:
        proc = _spawn(argv, scratch)
        try:
            proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        output = _reap(proc) if proc is not None else b""
        on_error = {"onexc" if sys.version_info >= (3, 12) else "onerror": lambda fn, path, exc: _force_remove(path)}
        shutil.rmtree(scratch, **on_error)
    lines = output.decode("utf-8", "replace").splitlines()
    if f"{nonce} ready" not in lines and not timed_out:
        raise SandboxError(f"code sandbox ({isolation}) did not start: exit code {proc.returncode}")
    passed = {ln.split()[1] for ln in lines if ln.startswith(nonce + " ") and ln.endswith(" pass")}
    flags = tuple(str(i) in passed for i in range(len(tests.tests)))
    return SandboxResult(flags, timed_out, isolation, proc.returncode, time.monotonic() - start)


def _reap(proc: subprocess.Popen) -> bytes:
    """Kill the sandbox's process group if still running, reap it, and read its pass marks without blocking."""
    if proc.returncode is None:  # not reaped yet, so its pid still names only its own group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    fd, chunks, total = proc.stdout.fileno(), [], 0
    os.set_blocking(fd, False)  # in basic mode a surviving grandchild could hold the pipe open
    while total < _RESULT_CAP_BYTES:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    proc.stdout.close()
    return b"".join(chunks)


def _force_remove(path: str) -> None:
    """rmtree fallback for entries the program made unreadable (chmod 000)."""
    if not os.path.lexists(path):  # rmtree retrying what an earlier fallback already removed
        return
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        logger.warning("code sandbox: could not remove %s", path)


@functools.cache
def namespace_isolation_available() -> bool:
    """Whether the namespace sandbox starts and locks down on this machine (one probe run, cached)."""
    if shutil.which("unshare") is None:
        return False
    try:
        result = _run("", CodeTests(tests=("pass",)), CodeRewardConfig(timeout_s=10.0), "namespace")
    except (OSError, SandboxError):
        return False
    return result.passed == (True,)


def resolve_isolation(cfg: CodeRewardConfig) -> str:
    """The isolation level a call with `cfg` uses here."""
    if cfg.isolation == "basic":
        return "basic"
    if namespace_isolation_available():
        return "namespace"
    if cfg.isolation == "namespace":
        raise SandboxError("isolation='namespace' needs `unshare` and unprivileged user namespaces")
    global _warned_basic
    if not _warned_basic:
        _warned_basic = True
        logger.warning("code sandbox: namespaces unavailable, using basic isolation (see dash/rewards/code.py)")
    return "basic"


def run_tests(code: str, tests: CodeTests, cfg: CodeRewardConfig | None = None) -> SandboxResult:
    """Run `code` then each test in a fresh sandbox; which tests passed. Raises SandboxError if it cannot start."""
    cfg = cfg or CodeRewardConfig()
    return _run(code, tests, cfg, resolve_isolation(cfg))


def code_reward(completion: str, answer: str, *, cfg: CodeRewardConfig | None = None) -> float:
    """1.0 if the completion's program passes the row's tests (`mode="all"`), or the passed fraction."""
    cfg = cfg or CodeRewardConfig()
    tests = parse_code_tests(answer)
    if tests is None:
        return 0.0
    result = run_tests(extract_code(completion), tests, cfg)
    if cfg.mode == "fraction":
        return sum(result.passed) / len(result.passed)
    return 1.0 if all(result.passed) else 0.0
