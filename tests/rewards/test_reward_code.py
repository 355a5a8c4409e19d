"""Code reward: extraction, test parsing, scoring, limits and level choice (each run a ~0.1 s sandboxed subprocess).

Hostile programs are NOT run here: they run in test_code_sandbox_attacks.py, inside a PID namespace of their own.
The programs below are well-behaved or only look at their own view of the machine.
"""

import json
import logging
import os
import tempfile
import time

import pytest

import dash.rewards.sandbox as sandbox_mod
from dash.rewards import SafeReward
from dash.rewards.code import CodeRewardConfig, CodeTests, SandboxError, code_reward, extract_code, parse_code_tests
from dash.rewards.code import run_tests as _run_tests
from dash.rewards.seccomp import seccomp_problem

SANDBOX_PROBLEM = sandbox_mod.sandbox_problem()
needs_sandbox = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=f"sandbox level unavailable: {SANDBOX_PROBLEM}")
needs_seccomp = pytest.mark.skipif(seccomp_problem() is not None, reason=f"no seccomp binding: {seccomp_problem()}")
LEVELS = [pytest.param("sandbox", marks=needs_sandbox), pytest.param("basic", marks=needs_seccomp)]
FAST = {"timeout_s": 3.0, "cpu_time_s": 2, "memory_mb": 256}
TESTS = json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])


def _cfg(level: str, **kw) -> CodeRewardConfig:
    return CodeRewardConfig(**{**FAST, "isolation": level, **kw})


def _outcome(code: str, check: str, level: str, **kw) -> bool:
    """Run `code` then one test `check`; whether that test passed."""
    return _run_tests(code, CodeTests(tests=(check,)), _cfg(level, **kw)).passed == (True,)


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nand better:\n```python\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```\nuntagged\n```") == "untagged\n"
    assert extract_code("```python\nx = 1\n```\n```\nnot python\n```") == "x = 1\n"
    assert extract_code("```python\ncut off by the length lim") == "cut off by the length lim"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_parse_code_tests():
    assert parse_code_tests(TESTS).tests == ("assert add(1, 2) == 3", "assert add(-1, 1) == 0")
    mbpp = parse_code_tests(json.dumps({"test_list": ["assert f()"], "test_imports": ["import math"]}))
    assert mbpp == CodeTests(tests=("assert f()",), setup="import math")
    assert parse_code_tests(json.dumps({"test": "check(f)", "setup": "x=1"})) == CodeTests(("check(f)",), "x=1")
    assert parse_code_tests("assert f() == 1") == CodeTests(tests=("assert f() == 1",))
    for bad in ("", "[]", json.dumps([1, 2]), json.dumps({"tests": []}), None):
        assert parse_code_tests(bad) is None


@pytest.mark.parametrize("level", LEVELS)
def test_correct_wrong_and_partial_solutions(level):
    good = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 3\n```"
    assert code_reward(good, TESTS, cfg=_cfg(level)) == 1.0
    assert code_reward(half, TESTS, cfg=_cfg(level)) == 0.0  # mode="all"
    assert code_reward(half, TESTS, cfg=_cfg(level, mode="fraction")) == 0.5
    assert code_reward("def add(a, b) return", TESTS, cfg=_cfg(level)) == 0.0  # syntax error
    assert code_reward("x = 1", "not json and not a test that passes: (", cfg=_cfg(level)) == 0.0
    # MBPP shapes: setup imports, isclose, set(), a test script with a step, `not`, a Counter (a dict subclass).
    answer = json.dumps({"tests": ["assert root(16) == 4", "assert math.isclose(root(2) ** 2, 2.0, rel_tol=1e-9)",
                                   "assert set(pair()) == set((1, 2))", "r = root(9)\nassert r == 3",
                                   "assert not root(0)", "assert count('aab') == {'a': 2, 'b': 1}"],
                         "setup": "import math"})  # fmt: skip
    code = "from collections import Counter\ndef root(x):\n    return math.isqrt(x) if x != 2 else math.sqrt(x)\n"
    code += "def pair():\n    return [2, 1]\ndef count(s):\n    return Counter(s)"
    assert code_reward(code, answer, cfg=_cfg(level)) == 1.0


@pytest.mark.parametrize("level", LEVELS)
def test_interpreter_features_work_under_the_filters(level):
    """Start-up, threads, time, random, math, tempfile, sqlite in the scratch dir: none needs a denied syscall."""
    code = (
        "import threading, time, random, math, tempfile, sqlite3, os\nout = []\n"
        "t = threading.Thread(target=lambda: out.append(math.factorial(5)))\nt.start()\nt.join()\n"
        "time.sleep(0.01)\nrandom.seed(1)\nx = random.random()\nfd, path = tempfile.mkstemp()\nos.close(fd)\n"
        "sqlite3.connect('db.sqlite').execute('create table t(x)')\nR = [out[0], time.localtime().tm_year > 2000]"
    )
    assert _outcome(code, "assert R == [120, True]", level)


@pytest.mark.parametrize("level", LEVELS)
def test_limits_stop_loops_sleeps_and_memory_bombs(level):
    start = time.monotonic()
    result = _run_tests("while True:\n    pass", CodeTests(tests=("assert True",)), _cfg(level, timeout_s=1.5))
    assert result.passed == (False,) and time.monotonic() - start < 5.0
    assert result.timed_out or result.returncode != 0  # CPU limit (SIGKILL) or wall clock, whichever first
    start = time.monotonic()  # a sleeping program uses no CPU: the wall clock stops it
    result = _run_tests("import time\ntime.sleep(60)", CodeTests(tests=("assert True",)), _cfg(level, timeout_s=1.0))
    assert result.timed_out and result.passed == (False,) and time.monotonic() - start < 4.0
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))"
    assert not _outcome(bomb, "assert True", level, memory_mb=192, timeout_s=5.0)
    # A small allocation works under the same limit, a larger one fails at once: the limit is what stops the bomb.
    assert _outcome("x = bytearray(64 * 2**20)", "assert True", level, memory_mb=192)
    assert not _outcome("x = bytearray(256 * 2**20)", "assert True", level, memory_mb=192)


@needs_sandbox
def test_sandbox_view_of_the_machine():
    """What a program sees at the sandbox level: uid 65534, only its own processes, a root of read-only binds."""
    code = (
        "import os\nR = [os.getuid(), os.getgid(), sorted(p for p in os.listdir('/proc') if p.isdigit()),"
        " sorted(os.listdir('/')), os.getcwd(), sorted(os.environ)]"
    )
    prefix_top = sandbox_mod.interpreter()[1].split("/")[1]
    root = {"usr", "dev", "proc", "scratch", "etc", prefix_top} | {d for d in ("bin", "sbin", "lib", "lib64", "lib32")
                                                                 if os.path.lexists("/" + d)}  # fmt: skip
    env = ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "PWD", "TMPDIR"]
    assert _outcome(code, f"assert R[:4] == [65534, 65534, ['1', '2'], {sorted(root)!r}]", "sandbox")
    assert _outcome(code, f"assert R[4:] == ['/scratch', {env!r}]", "sandbox")  # a fixed, minimal environment


@pytest.mark.parametrize("level", LEVELS)
def test_env_is_scrubbed_and_scratch_removed(tmp_path, monkeypatch, level):
    monkeypatch.setenv("DASH_SECRET_CANARY", "leak")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert _outcome("import os\nR = sorted(os.environ)", "assert 'DASH_SECRET_CANARY' not in R", level)
    assert _outcome("import os\nR = os.getcwd() == os.environ['HOME']", "assert R is True", level)
    code = "import os\nos.makedirs('d/e')\nopen('d/e/f', 'w').write('x')\nos.mkdir('z', 0)\ntry:\n"
    code += "    os.chmod('d', 0)\n    R = 'chmod worked'\nexcept PermissionError:\n    R = 'refused'"
    assert _outcome(code, "assert R == 'refused'", level)  # chmod is refused by seccomp
    assert list(tmp_path.iterdir()) == []  # scratch removed, including the mode-000 dir


@pytest.mark.parametrize("level", LEVELS)
def test_results_cannot_be_faked_by_printing_or_exiting(level):
    tests = json.dumps(["assert f() == 2"])
    fake = "import os\nprint('ready')\nfor i in range(3):\n    os.write(1, b'x %d pass\\n' % i)\ndef f():\n    return 1"
    assert code_reward(fake, tests, cfg=_cfg(level)) == 0.0
    assert code_reward("import os\ndef f():\n    return 1\nos._exit(0)", tests, cfg=_cfg(level)) == 0.0
    assert code_reward("import sys\nsys.exit(0)", tests, cfg=_cfg(level)) == 0.0
    patched = "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef f():\n    return 1"
    assert code_reward(patched, tests, cfg=_cfg(level)) == 0.0  # the harness bound exec before the program ran


@pytest.mark.parametrize("level", LEVELS)
def test_opaque_tests_fail_by_default_and_count_when_asked(level, caplog, monkeypatch):
    import dash.rewards.code as code_mod

    monkeypatch.setattr(code_mod, "_warned_opaque", False)
    answer = json.dumps({"test": "check(sq)", "setup": "def check(c):\n    assert c(2) == 4"})  # HumanEval style
    good = "def sq(x):\n    return x * x"
    with caplog.at_level(logging.WARNING, logger="dash.rewards.code"):
        assert code_reward(good, answer, cfg=_cfg(level)) == 0.0
    assert "opaque_tests='in_sandbox'" in caplog.text
    assert code_reward(good, answer, cfg=_cfg(level, opaque_tests="in_sandbox")) == 1.0
    assert code_reward("def sq(x):\n    return x", answer, cfg=_cfg(level, opaque_tests="in_sandbox")) == 0.0


@pytest.mark.parametrize("bwrap", [None, "echo 'bwrap: No permissions to create a new namespace' >&2; exit 1"])
def test_auto_refuses_where_bubblewrap_is_missing_or_cannot_start(monkeypatch, tmp_path, bwrap):
    """No bwrap on PATH, or one that fails the way it does under Docker's default seccomp profile: a clear error."""
    if bwrap is not None:
        (tmp_path / "bwrap").write_text(f"#!/bin/sh\n{bwrap}\n")
        (tmp_path / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox_mod.sandbox_problem.cache_clear()
    why = "not installed" if bwrap is None else "could not start.*No permissions to create a new namespace"
    try:
        for level in ("auto", "sandbox"):
            with pytest.raises(SandboxError, match=rf"bubblewrap.*{why}.*apt-get install bubblewrap.*'basic'"):
                code_reward("x = 1", "assert x == 1", cfg=_cfg(level))
        safe = SafeReward(lambda c, a: code_reward(c, a, cfg=_cfg("auto")))
        assert safe("x = 1", "assert x == 1") == 0.0 and safe.stats.errors == 1  # an error, not a verdict
    finally:
        monkeypatch.undo()
        sandbox_mod.sandbox_problem.cache_clear()


@needs_seccomp
def test_basic_warns_what_it_does_not_prevent(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_mod, "_warned_basic", False)
    with caplog.at_level(logging.WARNING, logger="dash.rewards.sandbox"):
        assert _outcome("x = 1", "assert x == 1", "basic")
        assert _outcome("x = 1", "assert x == 1", "basic")
    warnings = [r.getMessage() for r in caplog.records if "isolation='basic'" in r.getMessage()]
    assert len(warnings) == 1 and "NOT prevented" in warnings[0] and "namespace" in warnings[0]


def test_safe_reward_timeout_cleans_up_the_sandbox(tmp_path, monkeypatch):
    level = "sandbox" if SANDBOX_PROBLEM is None else "basic"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    safe = SafeReward(lambda c, a: code_reward(c, a, cfg=_cfg(level, timeout_s=30.0)), timeout_s=0.5)
    start = time.monotonic()
    assert safe("import time\ntime.sleep(60)", "assert True") == 0.0
    assert safe.stats.timeouts == 1 and time.monotonic() - start < 3.0
    assert list(tmp_path.iterdir()) == []  # scratch removed although the reward was interrupted


def test_config_validation():
    cases = (({"timeout_s": 0}, "timeout_s"), ({"mode": "most"}, "mode"), ({"isolation": "namespace"}, "isolation"),
             ({"opaque_tests": "trust"}, "opaque_tests"))  # fmt: skip
    for bad, name in cases:
        with pytest.raises(ValueError, match=f"CodeRewardConfig.{name}"):
            CodeRewardConfig(**bad)
