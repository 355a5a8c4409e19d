"""Run the code harness at one isolation level, and choose the level: `sandbox` (bubblewrap) or `basic`.

Purpose: `run_job` starts `dash/rewards/_harness.py` on one job in a fresh scratch dir and returns its records;
whatever happens (timeout, exception, SafeReward's alarm), everything it started is killed and reaped, and the
scratch dir removed, before it returns. Levels (`CodeRewardConfig.isolation`):
- `sandbox` (`dash/rewards/bwrap.py`): bubblewrap namespaces, uid 65534, read-only system binds, no network. As
  root (where uid 65534 exists) bubblewrap itself runs as uid/gid 65534 without supplementary groups, so the program
  is 65534:65534 outside its user namespace too (`bwrap.as_nobody`, whose root helpers expose an interpreter or
  scratch dir under a dir 65534 cannot search); the scratch dir and the job file are handed to uid 65534.
- `basic` (explicit opt-in only): no namespaces. Own session and process group (killed as a whole), rlimits, the
  seccomp filter, Landlock where the kernel has it (reads: system dirs and the interpreter only; writes: the scratch
  dir only; no TCP; no signals or abstract unix sockets out of the sandbox), and as root uid 65534 when the
  interpreter is reachable by it, else uid 0 with every capability dropped. `basic_gaps()` says what is then not
  prevented; it is logged once.
- `auto`: `sandbox` if bubblewrap starts here (probed once per process), else a SandboxError saying how to fix it.
At both levels: RLIMIT_CPU (SIGKILL), RLIMIT_AS, RLIMIT_FSIZE, no core files, no new processes and no signals or
sockets (`dash/rewards/seccomp.py`), a wall-clock timeout, and a bounded result channel (a pipe). Departures from
the paper: the paper has no code sandbox. Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dash.rewards import _harness, bwrap
from dash.rewards.bwrap import _ETC_FILES, _SYSTEM_DIRS, NOBODY, SCRATCH_IN_SANDBOX, PidNamespace, bwrap_argv
from dash.rewards.seccomp import filter_bpf, seccomp_problem

logger = logging.getLogger(__name__)

RESULT_CAP_BYTES = 4 << 20  # all records of one run; a program flooding the channel only loses its own values
_NAMESPACE_EXIT_S = 5.0  # an init killed by SIGKILL exits in milliseconds; this only bounds a broken kernel
_DEVICES_READ = ("/dev/urandom", "/dev/random", "/dev/zero")
_warned_basic = False


class SandboxError(RuntimeError):
    """The sandbox could not be set up or is unavailable; not a verdict on the program."""


@dataclass(frozen=True, slots=True)
class RunOutput:
    """What one harness run produced. Attributes: lines of its channel; timed_out; returncode; seconds."""

    lines: list[bytes]
    timed_out: bool
    returncode: int | None
    seconds: float


def interpreter() -> tuple[str, str]:
    """(python executable, its prefix): the base interpreter (a venv's packages are not shared with the program)."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(prefix + os.sep) and not exe.startswith("/usr/"):
        exe = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    if not os.access(exe, os.X_OK):
        raise SandboxError(f"code sandbox: no interpreter found under {prefix} for {sys.executable}")
    return exe, prefix


def _env(home: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})  # shared CPUs
    return env


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than owner and group can reach and read `path` (every parent dir has o+x)."""
    p = Path(path)
    return all(parent.stat().st_mode & 0o001 for parent in p.parents) and bool(p.stat().st_mode & 0o004)


def _basic_lockdown(scratch: str, exe: str, prefix: str) -> dict:
    """The job fields that make the harness lock itself down at the basic level."""
    drop_uid = NOBODY if _reachable_by_others(exe) and _reachable_by_others(prefix) else None
    if os.geteuid() == 0 and drop_uid is not None:
        try:
            os.chown(scratch, NOBODY, NOBODY)
        except OSError:  # uid 65534 is not mapped (root of a user namespace): keep uid 0, drop capabilities
            drop_uid = None
    reads = [*_SYSTEM_DIRS, prefix, *_ETC_FILES, *_DEVICES_READ]
    landlock = {"read": reads, "write": [scratch, os.devnull]} if landlock_abi() > 0 else None
    filters = [filter_bpf("base").hex(), filter_bpf("harness").hex()]
    return {"landlock": landlock, "drop_root": True, "drop_uid": drop_uid, "filters": filters}


def run_job(job: dict, level: str, timeout_s: float) -> RunOutput:
    """Run the harness on `job` (setup, code, tests, limits) at `level` ("sandbox" | "basic") in a new scratch dir."""
    exe, prefix = interpreter()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="dash-code-"))
    start, proc, namespace, fds, creds = time.monotonic(), None, None, [], {}
    as_root = level == "sandbox" and os.geteuid() == 0 and bwrap.nobody_is_mapped()
    try:
        if level == "sandbox":
            harness_filter = [filter_bpf("harness").hex()]  # bubblewrap loads the base filter itself
            job = {**job, "landlock": None, "drop_root": False, "drop_uid": None, "filters": harness_filter}
            memfd = os.memfd_create("dash-seccomp")  # close-on-exec here; bubblewrap reads the base filter from this fd
            info_read, info_write = os.pipe()
            fds += [memfd, info_read, info_write]
            os.write(memfd, filter_bpf("base"))
            os.lseek(memfd, 0, os.SEEK_SET)
            argv = bwrap_argv(shutil.which("bwrap") or "bwrap", scratch, prefix, _env(SCRATCH_IN_SANDBOX),
                              seccomp_fd=memfd, info_fd=info_write)  # fmt: skip
            cwd, env, pass_fds = "/", {}, (memfd, info_write)  # bubblewrap gets no environment to leak through /proc
            if as_root:  # never give the program root's uid outside: start bubblewrap as uid 65534
                argv, creds = bwrap.as_nobody(argv, [prefix, scratch], shutil.which("unshare") or "unshare")
        else:
            job = {**job, **_basic_lockdown(scratch, exe, prefix)}
            argv, cwd, env, pass_fds = [], scratch, _env(scratch), ()
        Path(scratch, "_job.json").write_text(json.dumps(job))
        for path in (scratch, os.path.join(scratch, "_job.json")) if as_root else ():
            os.chown(path, NOBODY, NOBODY)  # the harness reads and deletes the job file, the program writes here
        argv += [exe, "-I", "-B", "-S", "-c", Path(_harness.__file__).read_text()]
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, pass_fds=pass_fds, **creds,
        )  # fmt: skip
        if level == "sandbox":
            os.close(fds.pop())  # our copy of the info pipe's write end: EOF once bubblewrap has written its report
            namespace = PidNamespace(fds[-1], start + timeout_s)
        data, timed_out = _collect(proc, start + timeout_s)
    finally:
        if proc is not None:
            _kill_group(proc)
        if namespace is not None and not namespace.kill_and_wait(_NAMESPACE_EXIT_S):
            logger.error("code sandbox: the PID namespace of a run did not exit within %.0f s", _NAMESPACE_EXIT_S)
        for fd in fds:
            os.close(fd)
        _remove(scratch)
    return RunOutput(data.splitlines(), timed_out, proc.returncode, time.monotonic() - start)


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """Read the channel until every writer has gone, the cap, or the deadline; (data, timed_out)."""
    chunks, total = [], 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while total <= RESULT_CAP_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), True
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break  # EOF: the harness and everything inside have exited
            chunks.append(chunk)
            total += len(chunk)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return b"".join(chunks), True
    return b"".join(chunks)[:RESULT_CAP_BYTES], False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (bubblewrap's namespace init dies with it) and reap our child."""
    if proc.returncode is None:  # not reaped yet, so its pid still names only its own group
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group id is our child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    proc.stdout.close()


def _remove(scratch: str) -> None:
    """Delete the scratch dir, including entries the program made unreadable."""

    def force(fn, path, exc) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            logger.warning("code sandbox: could not remove %s", path)

    shutil.rmtree(scratch, **{"onexc" if sys.version_info >= (3, 12) else "onerror": force})


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    return max(libc.syscall(*_harness._long(_harness._NR["landlock_create_ruleset"], None, 0, 1)), 0)


@functools.cache
def sandbox_problem() -> str | None:
    """Why the `sandbox` level cannot run here (one probe run, cached), or None when it works."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (`bwrap`) is not installed"
    problem = seccomp_problem()
    if problem:
        return problem
    try:
        out = run_job({"setup": "", "code": "", "tests": [[["eval", "6 * 7"]]], "limits": []}, "sandbox", 10.0)
    except (OSError, SandboxError) as exc:
        return f"bubblewrap could not start: {exc}"
    if b'{"t":0,"k":0,"v":{"i":"42"}}' not in out.lines:
        said = b" ".join(out.lines)[:300].decode(errors="replace")
        return f"bubblewrap could not start (exit {out.returncode}): {said}"
    return None


def basic_gaps() -> list[str]:
    """What the basic level does not prevent on this machine."""
    gaps = ["no PID, mount or network namespace: the program shares the host's kernel namespaces (seccomp still "
            "refuses signals, sockets and new processes)"]  # fmt: skip
    if landlock_abi() == 0:
        gaps.append("no Landlock here: it can read and write every file the trainer's user can, including "
                    "/proc/<trainer pid>/environ and, as root, /etc/shadow")  # fmt: skip
    exe, prefix = interpreter()
    if os.geteuid() == 0 and not (_reachable_by_others(exe) and _reachable_by_others(prefix)):
        gaps.append(f"the interpreter ({prefix}) is not reachable by uid {NOBODY}, so the program runs as uid 0 "
                    "(without capabilities): root-owned files that Landlock lets it read are its own")  # fmt: skip
    gaps.append("kernel attack surface of every system call the filter allows")
    return gaps


def resolve_level(requested: str) -> str:
    """The level a call with isolation=`requested` runs at; SandboxError when it cannot run safely here."""
    if requested == "basic":
        problem = seccomp_problem()
        if problem:
            raise SandboxError(f"code sandbox (isolation='basic'): {problem}")
        global _warned_basic
        if not _warned_basic:
            _warned_basic = True
            logger.warning("code sandbox: isolation='basic'. NOT prevented: %s.", "; ".join(basic_gaps()))
        return "basic"
    problem = sandbox_problem()
    if problem is None:
        return "sandbox"
    raise SandboxError(
        f"code sandbox (isolation={requested!r}) is unavailable: {problem}. Fix: install bubblewrap (Debian/Ubuntu: "
        "`apt-get install bubblewrap`) and allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone"
        "=1 / user.max_user_namespaces > 0; in Docker, a seccomp profile that permits them); or opt in to the weaker "
        "isolation='basic' (see dash/rewards/sandbox.py for what it does not prevent)."
    )
