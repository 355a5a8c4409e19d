"""Every attack of issue 19 on the code sandbox, at both isolation levels, each inside a throwaway PID namespace.

Why a PID namespace per attack: if the sandbox failed, `os.kill(-1, 9)` as root would kill every process of the
machine running the tests; here it can only reach the driver's namespace (`sandbox_attack_driver.py`, PID 1 there).
Each test checks the driver's report: the trainer process survived with the expected pass flags (an attack that
worked shows up as a flag, e.g. a leaked secret makes `assert secret in R` pass), the canary process lives, no
connection reached the TCP or unix listener, the work dir (victim file, trainer-only secret) is unchanged, the
scratch dir is gone, and no process is left in the namespace.
"""

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_attacks import ATTACKS, EXPECTED, NEEDS_LANDLOCK_IN_BASIC, ONLY_ON_MACHINE

from dash.rewards.sandbox import landlock_abi, sandbox_problem
from dash.rewards.seccomp import seccomp_problem

DRIVER = Path(__file__).with_name("sandbox_attack_driver.py")
# Root creates the namespaces directly; anyone else needs a user namespace in which they are root.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
DRIVER_TIMEOUT_S = 600  # all attacks of one level; each is bounded by its own timeout


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
