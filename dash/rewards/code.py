"""Code-execution reward: run the completion's Python against the row's tests in a sandbox the program cannot leave.

Purpose: the paper's coding setting (MBPP+). The completion's program (its last ```python block, else its last
untagged ``` block, else the whole text) is run with the row's tests; reward = 1.0 if all pass (`mode="all"`, the
pass@1 notion) or the fraction that passed (`mode="fraction"`). Tests (`parse_code_tests`): a JSON list of Python
snippets (e.g. MBPP `assert` lines), a JSON object {"tests" | "test_list" | "test": ..., "setup" | "test_imports":
...}, or any other text taken as one test script. Each test runs after the program, in its globals.

What holds against a hostile program (details: `dash/rewards/sandbox.py`, `bwrap.py`, `seccomp.py`, `verdict.py`):
- At `isolation="sandbox"` (bubblewrap; `auto` picks it, and refuses with a SandboxError when it cannot start):
  it cannot signal, trace or outlive anything outside its own PID namespace, start processes or run programs,
  reach any socket (new network namespace, no socket() at all), see the trainer's files, /tmp, /run, /etc/shadow or
  the trainer's environment, or write anywhere but its scratch dir; it runs as uid 65534 without capabilities (outside
  its user namespace too when the trainer runs as root: bubblewrap is started as uid 65534; otherwise the trainer's
  uid), under rlimits (CPU, memory, file size) and a wall-clock timeout after
  which everything it started is killed.
- At `isolation="basic"` (explicit opt-in, a warning names what is not prevented): the same seccomp filter, rlimits,
  process-group kill and timeout; Landlock confines files and TCP where the kernel has it; no namespaces.
- Its result cannot be forged: assertions are split in the trainer (`dash/rewards/verdict.py`); only the program's
  own values come back, as exact builtin types, and are compared here with expected values that never enter the
  sandbox. Tests of no recognised form are *opaque*: with `opaque_tests="fail"` (default) they score 0 and a warning
  is logged once; with `opaque_tests="in_sandbox"` they count when they run without an exception inside, a verdict
  a program that subverts its interpreter CAN forge.
Not prevented: spending its CPU / memory / time budget; threads up to its memory limit; guessing values (a bare
`assert f(x)` only needs a truthy value). Inside, only the standard library is importable. Pass the completion
decoded without special tokens.

Departures from the paper: the paper's MBPP+ checker is not in its released code; limits and the sandbox are ours.
Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Literal

from dash.rewards.sandbox import SandboxError, resolve_level, run_job
from dash.rewards.records import check_passes, decode_records
from dash.rewards.verdict import TestPlan, plan_test

logger = logging.getLogger(__name__)

_warned_opaque = False  # log "opaque tests score 0" once, not per call
ISOLATIONS = ("auto", "sandbox", "basic")


@dataclass(frozen=True, kw_only=True, slots=True)
class CodeRewardConfig:
    """Limits and scoring of the code reward."""

    timeout_s: float = 5.0
    """Wall-clock limit per completion (all its tests); everything it started is SIGKILLed after it."""
    cpu_time_s: int = 4
    """RLIMIT_CPU of the program, seconds of CPU."""
    memory_mb: int = 1024
    """RLIMIT_AS of the program (address space, so a bit above the real memory it may use)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write (in the scratch dir)."""
    mode: Literal["all", "fraction"] = "all"
    """Reward 1.0 only if every test passes, or the fraction of tests that passed."""
    isolation: Literal["auto", "sandbox", "basic"] = "auto"
    """`auto`/`sandbox`: bubblewrap, else a SandboxError. `basic`: no namespaces (logs what is not prevented)."""
    opaque_tests: Literal["fail", "in_sandbox"] = "fail"
    """Tests whose verdict cannot be kept out of the sandbox: score 0, or trust the in-sandbox run (forgeable)."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_time_s", "memory_mb", "max_file_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CodeRewardConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name, allowed in (("mode", ("all", "fraction")), ("isolation", ISOLATIONS),
                              ("opaque_tests", ("fail", "in_sandbox"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"CodeRewardConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


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


def _limits(cfg: CodeRewardConfig) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    return [
        # soft == hard: the kernel then sends SIGKILL at the limit (a lower soft limit sends SIGXCPU first, which a
        # program may ignore).
        ("RLIMIT_CPU", cfg.cpu_time_s, cfg.cpu_time_s),
        ("RLIMIT_AS", cfg.memory_mb * mb, cfg.memory_mb * mb),
        ("RLIMIT_FSIZE", cfg.max_file_mb * mb, cfg.max_file_mb * mb),
        ("RLIMIT_CORE", 0, 0),
    ]


def _passed(plan: TestPlan, index: int, values: dict, finished: set[int], cfg: CodeRewardConfig) -> bool:
    if plan.opaque and cfg.opaque_tests == "fail":
        global _warned_opaque
        if not _warned_opaque:
            _warned_opaque = True
            logger.warning(
                "code reward: a test fits no assertion form whose verdict can be kept out of the sandbox (e.g. "
                "`check(f)`); it scores 0. Set CodeRewardConfig.opaque_tests='in_sandbox' to count such tests "
                "(a program that subverts its interpreter can then forge them). See dash/rewards/verdict.py."
            )
        return False
    slots = {slot: value for (test, slot), value in values.items() if test == index}
    # An opaque test counted in the sandbox has no checks: it passes when it ran to the end.
    return index in finished and all(check_passes(check, slots) for check in plan.checks)


def run_tests(code: str, tests: CodeTests, cfg: CodeRewardConfig | None = None) -> SandboxResult:
    """Run `code` then each test in a fresh sandbox; which tests passed. Raises SandboxError if it cannot run."""
    cfg = cfg or CodeRewardConfig()
    level = resolve_level(cfg.isolation)
    plans = [plan_test(t) for t in tests.tests]
    # An opaque test that scores 0 anyway is not sent: its text may hold the expected values of other tests.
    sent = [[] if p.opaque and cfg.opaque_tests == "fail" else list(map(list, p.steps)) for p in plans]
    job = {"setup": tests.setup, "code": code, "tests": sent, "limits": _limits(cfg)}
    out = run_job(job, level, cfg.timeout_s)
    values, finished, ready = decode_records(out.lines)
    if not ready and not out.timed_out:
        text = b" ".join(out.lines).decode("utf-8", "replace")[:300]
        raise SandboxError(f"code sandbox ({level}) did not start: exit code {out.returncode}: {text}")
    passed = tuple(_passed(plan, i, values, finished, cfg) for i, plan in enumerate(plans))
    return SandboxResult(passed, out.timed_out, level, out.returncode, out.seconds)


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


__all__ = ["CodeRewardConfig", "CodeTests", "SandboxError", "SandboxResult", "code_reward", "extract_code",
           "parse_code_tests", "run_tests"]  # fmt: skip
