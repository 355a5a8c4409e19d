"""Run hostile completions against the code sandbox and report what each reached. Meant to be PID 1 of a new PID ns.

Why a driver: a sandbox that fails an attack must not hurt the machine running the tests, so
`tests/rewards/test_code_sandbox_attacks.py` starts this file under `unshare --pid --fork --mount-proc` (+ a user
namespace when not root). `os.kill(-1, 9)` or `kill -9 $PPID` can then only reach processes of that namespace.

Roles (argv[1]):
- `main <isolation> <attack,attack,...>`: PID 1. For each attack sets up what it may try to reach: a work dir under
  /tmp with a victim file and a trainer-owned secret (mode 600), a TCP listener on 127.0.0.1, a unix socket under
  /tmp, a canary process standing in for the rest of the machine; hands the attack to the trainer; then reports (one
  JSON object, by attack): whether the trainer died, its result, whether the canary lives, whether a connection
  arrived, whether the work dir changed or a scratch dir was left, which processes are left in the namespace, and
  the kernel credentials (uid, gid, groups, effective capabilities) of every sandboxed process, read from outside
  through /proc/<pid>/status while the attack ran (`CredentialWatch`).
- `trainer <isolation>`: a long-lived child with a fake API key in its environment; reads one attack per line,
  calls `run_tests` on it (`sandbox_attacks.ATTACKS`) and prints the pass flags. In `basic` isolation the program's
  parent is this process; in `sandbox`, bubblewrap.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_attacks import ATTACKS, PRELUDE  # noqa: E402 -- after the path tweak, so this file runs as a script

TRAINER_TIMEOUT_S = 60.0
WATCH_PERIOD_S = 0.02  # how often the credentials of sandboxed processes are sampled


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `root`: mode and (for files) content, to see any write, delete or chmod."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        body = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        seen[str(path)] = (st.st_mode, body)
    return seen


def _accepted(server: socket.socket) -> bool:
    server.setblocking(False)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def _reap_orphans() -> None:
    """As PID 1, reap what was reparented to us (as the host's init would): exited processes are not survivors."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _processes() -> dict[int, str]:
    _reap_orphans()
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines = (entry / "status").read_text().splitlines()
                status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                procs[int(entry.name)] = f"{status['Name']} state={status['State']} ppid={status['PPid']}: {cmdline}"
            except OSError:
                pass
    return procs


def _nested_credentials(own_pid_ns: str) -> set[tuple[str, ...]]:
    """(Name, Uid, Gid, Groups, CapEff) of each process in a PID namespace below ours: bubblewrap's init and the
    sandboxed program (the driver's PID namespace holds the trainer, bubblewrap's monitor and its helpers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") == own_pid_ns:
                continue
            lines = (entry / "status").read_text().splitlines()
        except OSError:
            continue  # exited meanwhile
        status = dict(line.split(":", 1) for line in lines if ":" in line)
        found.add(tuple(status.get(key, "").strip() for key in ("Name", "Uid", "Gid", "Groups", "CapEff")))
    return found


class CredentialWatch:
    """Samples `_nested_credentials` from outside the sandbox for as long as the `with` block runs."""

    def __init__(self) -> None:
        self.own_pid_ns, self.seen, self._stop = os.readlink("/proc/self/ns/pid"), set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.seen |= _nested_credentials(self.own_pid_ns)
            if self._stop.wait(WATCH_PERIOD_S):
                return

    def __enter__(self) -> CredentialWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Trainer:
    """The `trainer` role as a long-lived child (importing dash costs seconds); restarted if an attack killed it."""

    def __init__(self, isolation: str, env: dict[str, str]) -> None:
        self.isolation, self.env, self.proc = isolation, env, None

    def run(self, attack: str, ctx_path: str) -> tuple[int | None, str, str]:
        """(exit code if it died, its result line, its stderr if it died) for one attack."""
        if self.proc is None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "trainer", self.isolation], env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        self.proc.stdin.write(json.dumps({"attack": attack, "ctx": ctx_path}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TRAINER_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return None, line, ""
        self.proc.kill()
        _, err = self.proc.communicate()
        code, self.proc = self.proc.returncode, None
        return code, "", err[-2000:]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


def attack_once(trainer: Trainer, attack: str) -> dict:
    """Set up the targets, run one attack through the trainer, and report what it reached."""
    workdir = Path(tempfile.mkdtemp(prefix="dash-attack-"))
    (workdir / "victim.txt").write_text("original")
    secret = workdir / "secret.txt"
    secret.write_text("TRAINER-SECRET-" + secrets.token_hex(8))
    secret.chmod(0o600)
    tcp, unix = socket.socket(), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    unix.bind(str(workdir / "sock"))
    for server in (tcp, unix):
        server.listen(8)
    ctx = {"workdir": str(workdir), "port": tcp.getsockname()[1], "unix": str(workdir / "sock"),
           "secret": secret.read_text(), "api_key": trainer.env["FAKE_API_KEY"],
           "expected": "EXPECTED-" + secrets.token_hex(8), "repo_file": str(Path(__file__).resolve())}  # fmt: skip
    (workdir / "ctx.json").write_text(json.dumps(ctx))
    canary = subprocess.Popen(["sleep", "1000"])
    before = _snapshot(workdir)
    with CredentialWatch() as watch:
        died, out, err = trainer.run(attack, str(workdir / "ctx.json"))
    time.sleep(0.2)  # let anything the program started show up in /proc if it survived
    keep = {1, canary.pid} | ({trainer.proc.pid} if trainer.proc is not None else set())
    report = {
        "trainer_died": died, "trainer_out": out, "trainer_err": err,
        "canary_alive": canary.poll() is None,
        "tcp_connected": _accepted(tcp), "unix_connected": _accepted(unix),
        "workdir_unchanged": _snapshot(workdir) == before,
        "scratch_removed": list(Path(trainer.env["TMPDIR"]).iterdir()) == [],
        "stray_processes": {pid: cmd for pid, cmd in _processes().items() if pid not in keep},
        "sandboxed_credentials": sorted(watch.seen),
    }  # fmt: skip
    canary.kill()
    canary.wait()
    tcp.close()
    unix.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(isolation: str, attacks: list[str]) -> dict:
    trainer_tmp = Path(tempfile.mkdtemp(prefix="dash-attack-tmp-"))  # where the trainer's scratch dirs go
    env = {**os.environ, "FAKE_API_KEY": "sk-canary-" + secrets.token_hex(8), "TMPDIR": str(trainer_tmp)}
    trainer = Trainer(isolation, env)
    try:
        return {attack: attack_once(trainer, attack) for attack in attacks}
    finally:
        trainer.close()
        shutil.rmtree(trainer_tmp, ignore_errors=True)


def trainer_loop(isolation: str) -> None:
    from dash.rewards.code import CodeRewardConfig, CodeTests, _limits, run_tests
    from dash.rewards.sandbox import run_job
    from dash.rewards.records import decode_records

    for line in sys.stdin:
        request = json.loads(line)
        ctx = json.loads(Path(request["ctx"]).read_text())
        code, tests, extra = ATTACKS[request["attack"]](ctx)
        code = PRELUDE + code
        cfg = CodeRewardConfig(isolation=isolation, timeout_s=extra.get("timeout_s", 10.0), cpu_time_s=5, memory_mb=512)
        result = run_tests(code, CodeTests(tests=tuple(tests)), cfg)
        # A second run that sends back R (the attempts' outcomes), so that a failing test shows what the program saw.
        job = {"setup": "", "code": code, "tests": [[["eval", "R"]]], "limits": _limits(cfg)}
        values, _, _ = decode_records(run_job(job, result.isolation, cfg.timeout_s).lines)
        report = {"passed": list(result.passed), "isolation": result.isolation, "timed_out": result.timed_out}
        print(json.dumps({**report, "observed": repr(values.get((0, 0)))}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "main":
        print(json.dumps(main(sys.argv[2], sys.argv[3].split(","))))
    else:
        trainer_loop(sys.argv[2])
