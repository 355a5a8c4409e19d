"""Every attack of issue 19 on the code sandbox, at both isolation levels, each inside a throwaway PID namespace.

Why a PID namespace per attack: if the sandbox failed, `os.kill(-1, 9)` as root would kill every process of the
machine running the tests; here it can only reach the driver's namespace (`sandbox_attack_driver.py`, PID 1 there).
Each test checks the driver's report: the trainer process survived with the expected pass flags (an attack that
worked shows up as a flag, e.g. a leaked secret makes `assert secret in R` pass), the canary process lives, no
connection reached the TCP or unix listener, the work dir (victim file, trainer-only secret) is unchanged, the
scratch dir is gone, and no process is left in the namespace. As root, the driver also reads the kernel credentials
of the sandboxed processes from outside (/proc/<pid>/status): they must be uid/gid 65534 with no supplementary
groups and no capabilities, not the trainer's root.
"""

import functools
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from sandbox_attacks import ATTACKS, EXPECTED, NEEDS_LANDLOCK_IN_BASIC, ONLY_ON_MACHINE

import dash.rewards.sandbox as sandbox_mod
from dash.rewards.bwrap import NOBODY, as_nobody, unsearchable_dirs
from dash.rewards.sandbox import landlock_abi, sandbox_problem
from dash.rewards.seccomp import seccomp_problem

DRIVER = Path(__file__).with_name("sandbox_attack_driver.py")
# Root creates the namespaces directly; anyone else needs a user namespace in which they are root.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
DRIVER_TIMEOUT_S = 600  # all attacks of one level; each is bounded by its own timeout
# Uid and Gid lines (real, effective, saved, filesystem) and Groups of /proc/<pid>/status for uid/gid 65534.
UNPRIVILEGED = ("\t".join([str(NOBODY)] * 4), "\t".join([str(NOBODY)] * 4), "")
NO_CAPABILITIES = "0" * 16  # CapEff of the program (bubblewrap's setup child holds some in its own namespace)


def _unprivileged(seen: list) -> bool:
    """Each (name, uid, gid, groups, cap_eff) is 65534:65534 without supplementary groups and, unless it is
    bubblewrap (whose child holds capabilities in the namespaces it owns while it sets them up), no capabilities."""
    return all(tuple(c[1:4]) == UNPRIVILEGED and (c[0] == "bwrap" or c[4] == NO_CAPABILITIES) for c in seen)


@functools.cache
def _pid_namespace_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed, so the attacks cannot be confined to a PID namespace"
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a PID namespace for the attack driver: {probe.stderr.decode(errors='replace')[:200]}"
    return None


def _skip_reason(level: str, attack: str) -> str | None:
    problem = _pid_namespace_problem() or seccomp_problem()
    if problem:
        return problem
    if ONLY_ON_MACHINE.get(attack, platform.machine()) != platform.machine():
        return f"{attack} is specific to {ONLY_ON_MACHINE[attack]} (this machine: {platform.machine()})"
    if level == "sandbox" and sandbox_problem():
        return f"sandbox level unavailable here: {sandbox_problem()}"
    if level == "basic" and attack in NEEDS_LANDLOCK_IN_BASIC and landlock_abi() == 0:
        return "no Landlock in this kernel: at the basic level files are not confined (documented gap)"
    return None


@functools.cache
def _reports(level: str) -> dict[str, dict]:
    """Run every applicable attack of `level` in one driver (one PID namespace, one trainer process, fresh targets
    per attack): importing dash in the trainer costs seconds, an attack well under one."""
    attacks = sorted(a for a in ATTACKS if _skip_reason(level, a) is None)
    proc = subprocess.run(
        [*UNSHARE, sys.executable, str(DRIVER), "main", level, ",".join(attacks)],
        capture_output=True, timeout=DRIVER_TIMEOUT_S, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, f"attack driver failed: {proc.stderr.decode(errors='replace')[-3000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("level", ["sandbox", "basic"])
def test_attack_is_contained(level, attack):
    reason = _skip_reason(level, attack)
    if reason:
        pytest.skip(reason)
    report = _reports(level)[attack]
    assert report["trainer_died"] is None, f"the trainer process died: {report}"
    trainer = json.loads(report["trainer_out"])
    assert trainer["isolation"] == level
    assert tuple(trainer["passed"]) == EXPECTED[attack], f"pass flags; the program saw R = {trainer['observed']}"
    assert report["canary_alive"], "a process outside the sandbox was killed"
    assert not report["tcp_connected"], "a connection reached the TCP listener on 127.0.0.1"
    assert not report["unix_connected"], "a connection reached the unix socket under /tmp"
    assert report["workdir_unchanged"], "a file outside the scratch dir was written, removed or chmod-ed"
    assert report["scratch_removed"], "the scratch dir was left behind"
    assert report["stray_processes"] == {}, "processes outlived the call"


def test_sandboxed_program_is_unprivileged_outside_when_the_trainer_is_root():
    """Read from outside while the program sleeps: every process in bubblewrap's PID namespace is 65534:65534."""
    if os.geteuid() != 0:
        pytest.skip("the trainer is not root: outside, the program has the trainer's own unprivileged uid, by design")
    reason = _skip_reason("sandbox", "watched_sleep")
    if reason:
        pytest.skip(reason)
    seen = _reports("sandbox")["watched_sleep"]["sandboxed_credentials"]
    assert any(name.startswith("python") for name, *_ in seen), f"the sleeping program was never seen: {seen}"
    assert _unprivileged(seen), f"(name, uid, gid, groups, cap_eff) seen: {seen}"
    everywhere = [c for report in _reports("sandbox").values() for c in report["sandboxed_credentials"]]
    assert _unprivileged(everywhere), f"(name, uid, gid, groups, cap_eff) during some attack: {everywhere}"


def test_as_nobody_exposes_only_what_uid_65534_cannot_reach():
    """Where every dir on the way is searchable, Popen drops to 65534 itself; else a root bubblewrap covers the
    outermost unsearchable dir with a mode-755 tmpfs and binds the needed dirs back at their own paths."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp: searchable by everyone, unlike pytest's tmp_path
    try:
        base.chmod(0o755)
        (base / "open" / "deep").mkdir(parents=True)
        (base / "closed" / "a" / "b").mkdir(parents=True)
        (base / "closed").chmod(0o700)  # like /root
        (base / "closed" / "a" / "inner").mkdir(mode=0o700)  # below an already covered dir: no second tmpfs
        reachable, hidden = str(base / "open" / "deep"), str(base / "closed" / "a" / "b")
        argv, creds = as_nobody(["bwrap", "--x"], [reachable], "/usr/bin/unshare")
        assert argv == ["bwrap", "--x"] and creds == {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        assert unsearchable_dirs([reachable, hidden, str(base / "closed" / "a" / "inner" / "c")]) == [
            str(base / "closed")
        ]
        argv, creds = as_nobody(["bwrap", "--x"], [reachable, hidden], "/usr/bin/unshare")
        cut = argv.index("/usr/bin/unshare")
        assert creds == {} and argv[cut:] == ["/usr/bin/unshare", "--fork", "--setuid=65534", "--setgid=65534", "--",
                                             "bwrap", "--x"]  # fmt: skip
        outer = " ".join(argv[: argv.index("--")])
        closed = base / "closed"
        assert f"--perms 0755 --tmpfs {closed} --perms 0755 --dir {closed / 'a'} --bind {hidden} {hidden}" in outer
        assert reachable not in outer and stat.S_IMODE(closed.stat().st_mode) == 0o700  # the real dir is untouched
    finally:
        shutil.rmtree(base)


def test_program_writes_as_65534_when_popen_drops_directly(monkeypatch):
    """Interpreter and scratch dir searchable by everyone (the system python, a mode-755 dir under /tmp): no root
    helper, Popen starts bubblewrap as 65534. Seen from outside: the file the program writes is owned by 65534."""
    system_python = shutil.which("python3", path="/usr/bin")
    if os.geteuid() != 0 or sandbox_problem() or system_python is None:
        pytest.skip("needs root, the sandbox level and /usr/bin/python3 (an interpreter every user can reach)")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    base.chmod(0o755)
    monkeypatch.setattr(sandbox_mod, "interpreter", lambda: (os.path.realpath(system_python), "/usr"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    owners, done = set(), threading.Event()

    def watch() -> None:  # the scratch dir is removed when the call returns: look while the program sleeps
        while not done.wait(0.01):
            for mark in base.glob("dash-code-*/mark"):
                try:
                    owners.add((mark.stat().st_uid, mark.stat().st_gid))
                except OSError:
                    pass  # removed meanwhile

    watcher = threading.Thread(target=watch)
    watcher.start()
    code = "open('mark', 'w').close()\nimport time\ntime.sleep(0.5)"
    try:
        out = sandbox_mod.run_job({"setup": "", "code": code, "tests": [], "limits": []}, "sandbox", 20.0)
        scratch_left = list(base.iterdir())
    finally:
        done.set()
        watcher.join()
        shutil.rmtree(base)
    assert b'{"ready":1}' in out.lines, out
    assert owners == {(NOBODY, NOBODY)}, f"owner (uid, gid) of the program's file, seen from outside: {owners}"
    assert scratch_left == []
