"""Code reward: extraction, test parsing, scoring, and what the sandbox prevents (each case a ~0.1 s subprocess)."""

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

import dash.rewards.code as code_mod
from dash.rewards import SafeReward
from dash.rewards.code import (
    CodeRewardConfig,
    CodeTests,
    SandboxError,
    code_reward,
    extract_code,
    namespace_isolation_available,
    parse_code_tests,
    run_tests,
)

HAS_NS = namespace_isolation_available()
NS_REASON = "namespace sandbox unavailable here (needs util-linux unshare + unprivileged user namespaces)"
ISOLATIONS = ["basic", pytest.param("namespace", marks=pytest.mark.skipif(not HAS_NS, reason=NS_REASON))]
needs_ns = pytest.mark.skipif(not HAS_NS, reason=NS_REASON)
FAST = {"timeout_s": 2.0, "cpu_time_s": 1, "memory_mb": 256}
TESTS = json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])


def _cfg(**kw) -> CodeRewardConfig:
    return CodeRewardConfig(**{**FAST, **kw})


def _outcome(code: str, tmp_check: str, **kw) -> bool:
    """Run `code` then one test `tmp_check`; whether that test passed."""
    return run_tests(code, CodeTests(tests=(tmp_check,)), _cfg(**kw)).passed == (True,)


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


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_correct_wrong_and_partial_solutions(isolation):
    good = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 3\n```"
    assert code_reward(good, TESTS, cfg=_cfg(isolation=isolation)) == 1.0
    assert code_reward(half, TESTS, cfg=_cfg(isolation=isolation)) == 0.0  # mode="all"
    assert code_reward(half, TESTS, cfg=_cfg(isolation=isolation, mode="fraction")) == 0.5
    assert code_reward("def add(a, b) return", TESTS, cfg=_cfg(isolation=isolation)) == 0.0  # syntax error
    assert code_reward("x = 1", "not json and not a test that passes: (", cfg=_cfg(isolation=isolation)) == 0.0
    # Setup code (MBPP test_imports) runs before the program.
    answer = json.dumps({"tests": ["assert root(16) == 4"], "setup": "import math"})
    assert code_reward("def root(x):\n    return math.isqrt(x)", answer, cfg=_cfg(isolation=isolation)) == 1.0


def test_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_tests("while True:\n    pass", CodeTests(tests=("pass",)), _cfg(timeout_s=1.5))
    assert result.passed == (False,) and time.monotonic() - start < 5.0
    assert result.timed_out or result.returncode != 0  # CPU limit (SIGKILL) or wall clock, whichever first
    # A program that sleeps uses no CPU: the wall clock kills it.
    start = time.monotonic()
    result = run_tests("import time\ntime.sleep(60)", CodeTests(tests=("pass",)), _cfg(timeout_s=1.0))
    assert result.timed_out and result.passed == (False,) and time.monotonic() - start < 4.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_memory_bomb_is_limited(isolation):
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))"
    assert not _outcome(bomb, "pass", isolation=isolation, memory_mb=192, timeout_s=5.0)
    # A small allocation works under the same limit, a larger one fails at once: the limit is what stops the bomb.
    assert _outcome("x = bytearray(64 * 2**20)", "pass", isolation=isolation, memory_mb=192)
    assert not _outcome("x = bytearray(256 * 2**20)", "pass", isolation=isolation, memory_mb=192)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_kill_parent_attempt_is_refused(isolation):
    code = "import os\nos.kill(os.getppid(), 9)\ndef f():\n    return 1"
    assert code_reward(code, json.dumps(["assert f() == 1"]), cfg=_cfg(isolation=isolation)) == 0.0
    probe = "import os\ntry:\n    os.kill(os.getppid(), 9)\n    R = 'sent'\nexcept PermissionError:\n    R = 'refused'"
    assert _outcome(probe, "assert R == 'refused'", isolation=isolation)
    assert os.getpid() > 0  # still here


@needs_ns
def test_namespace_hides_the_trainer_even_without_the_guard():
    assert _outcome("import os", "assert os.getppid() == 0", isolation="namespace", guard=False)
    probe = (
        f"import os\ntry:\n    os.kill({os.getpid()}, 0)\n    R = 'visible'\nexcept ProcessLookupError:\n    R = 'gone'"
    )
    assert _outcome(probe, "assert R == 'gone'", isolation="namespace", guard=False)
    # The literal attempt: getppid() is 0, so this signals the sandbox's own process group, never the trainer.
    _outcome("import os\nos.kill(os.getppid(), 9)", "pass", isolation="namespace", guard=False)
    assert os.getpid() > 0


@needs_ns
def test_namespace_disables_devices_and_hides_run():
    full = "try:\n    open('/dev/full', 'w')\n    R = 'opened'\nexcept OSError as e:\n    R = repr(e)"
    if Path("/dev/full").exists():  # a world-writable device: opening it proves device nodes are disabled
        assert _outcome(full, "assert R != 'opened', R", isolation="namespace", guard=False)
    harmless = "import os\nopen(os.devnull, 'w').write('x')\nR = open('/dev/urandom', 'rb').read(4)"
    assert _outcome(harmless, "assert len(R) == 4", isolation="namespace", guard=False)
    assert _outcome("import os", "assert os.listdir('/run') == []", isolation="namespace", guard=False)


@pytest.mark.parametrize(
    "isolation,guard", [("basic", True), pytest.param("namespace", False, marks=needs_ns), ("auto", True)]
)
def test_writes_outside_scratch_fail(tmp_path, isolation, guard):
    target = tmp_path / "escaped.txt"
    code = f"try:\n    open({str(target)!r}, 'w').write('x')\n    R = 'written'\nexcept OSError as e:\n    R = repr(e)"
    assert _outcome(code, "assert R != 'written', R", isolation=isolation, guard=guard)
    assert not target.exists()
    # Relative writes land in the scratch dir, which is writable.
    assert _outcome("open('out.txt', 'w').write('ok')", "assert open('out.txt').read() == 'ok'", isolation=isolation)


@pytest.mark.parametrize(
    "isolation,guard", [("basic", True), pytest.param("namespace", False, marks=needs_ns), ("auto", True)]
)
def test_network_is_blocked(isolation, guard):
    with socket.socket() as server:  # a listener on the trainer's loopback: no internet needed for this test
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.05)
        port = server.getsockname()[1]
        code = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "    R = 'connected'\nexcept OSError as e:\n    R = repr(e)"
        )
        assert _outcome(code, "assert R != 'connected', R", isolation=isolation, guard=guard)
        with pytest.raises(socket.timeout):
            server.accept()


def test_env_is_scrubbed_and_scratch_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("DASH_SECRET_CANARY", "leak")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert _outcome("import os", "assert 'DASH_SECRET_CANARY' not in os.environ and os.getcwd() == os.environ['HOME']")
    assert _outcome("import os\nos.makedirs('d/e')\nos.chmod('d', 0)", "pass")  # even an unreadable dir is removed
    assert list(tmp_path.iterdir()) == []


def test_results_cannot_be_faked_by_printing_or_exiting():
    tests = json.dumps(["assert f() == 2"])
    fake = "import os\nprint('ready')\nfor i in range(3):\n    os.write(1, b'x %d pass\\n' % i)\ndef f():\n    return 1"
    assert code_reward(fake, tests, cfg=_cfg()) == 0.0
    assert code_reward("import os\ndef f():\n    return 1\nos._exit(0)", tests, cfg=_cfg()) == 0.0
    assert code_reward("import sys\nsys.exit(0)", tests, cfg=_cfg()) == 0.0
    patched = "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef f():\n    return 1"
    assert code_reward(patched, tests, cfg=_cfg()) == 0.0  # the harness bound exec before the program ran


@needs_ns
def test_no_process_outlives_the_call():
    marker = "31.4159"  # unique argument to find stray processes in the host's /proc
    code = f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])"
    assert _outcome(code, "pass", isolation="namespace", guard=False)
    time.sleep(0.1)
    stray = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert stray == []


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_guard_refuses_fork_in_basic_mode():
    code = "import os\ntry:\n    os.fork()\n    R = 'forked'\nexcept PermissionError:\n    R = 'refused'"
    assert _outcome(code, "assert R == 'refused'", isolation="basic")


def test_sandbox_failure_is_an_error_not_a_verdict(monkeypatch):
    monkeypatch.setattr(code_mod, "namespace_isolation_available", lambda: False)
    cfg = _cfg(isolation="namespace")
    with pytest.raises(SandboxError):
        code_reward("x = 1", "pass", cfg=cfg)
    safe = SafeReward(lambda c, a: code_reward(c, a, cfg=cfg))
    assert safe("x = 1", "pass") == 0.0 and safe.stats.errors == 1


def test_auto_falls_back_to_basic(monkeypatch):
    monkeypatch.setattr(code_mod, "namespace_isolation_available", lambda: False)
    result = run_tests("def f():\n    return 1", CodeTests(tests=("assert f() == 1",)), _cfg(isolation="auto"))
    assert result.isolation == "basic" and result.passed == (True,)


def test_safe_reward_timeout_cleans_up_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    safe = SafeReward(lambda c, a: code_reward(c, a, cfg=_cfg(timeout_s=30.0)), timeout_s=0.5)
    start = time.monotonic()
    assert safe("import time\ntime.sleep(60)", "pass") == 0.0
    assert safe.stats.timeouts == 1 and time.monotonic() - start < 3.0
    assert list(tmp_path.iterdir()) == []  # scratch removed although the reward was interrupted


def test_config_validation():
    with pytest.raises(ValueError):
        CodeRewardConfig(timeout_s=0)
    with pytest.raises(ValueError):
        CodeRewardConfig(mode="most")
