"""Format reward, reward combination and the name registry (`get_reward`, `get_answer_parser`)."""

import json
import subprocess
import sys

import pytest

from dash.rewards import available_rewards, combine_rewards, get_answer_parser, get_reward, register_reward
from dash.rewards.format import FormatRewardConfig, count_boxed, format_reward


def test_format_reward_single_box():
    assert format_reward("so \\boxed{3}") == 1.0
    assert format_reward("\\boxed{3} or \\boxed{4}") == 0.0  # two answers: ambiguous
    assert format_reward("\\boxed{3") == 0.0  # never closed
    assert format_reward("\\boxed{  }") == 0.0  # empty
    assert format_reward("no box") == 0.0
    assert count_boxed("\\boxed{1}\\fbox{2}") == 2


def test_format_reward_eos():
    cfg = FormatRewardConfig(require_single_boxed=False, require_eos=True, eos_token="<eos>")
    assert format_reward("done<eos><pad><pad>", cfg=cfg) == 1.0
    assert format_reward("cut at the length lim", cfg=cfg) == 0.0
    both = FormatRewardConfig(require_eos=True, eos_token="<eos>")
    assert format_reward("\\boxed{1}<eos>\\boxed{2}", cfg=both) == 1.0  # text after EOS is padding, ignored
    with pytest.raises(ValueError, match="eos_token"):
        FormatRewardConfig(require_eos=True)
    with pytest.raises(ValueError):
        FormatRewardConfig(require_single_boxed=False)


def test_combine_rewards():
    fn = combine_rewards({"math": 1.0, "format": 0.1})
    assert fn("\\boxed{4}", "4") == pytest.approx(1.1)
    assert fn("\\boxed{5}", "4") == pytest.approx(0.1)
    assert fn("\\boxed{4} \\boxed{4}", "4") == pytest.approx(1.0)
    assert get_reward("math+format")("\\boxed{4}", "4") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        combine_rewards({})


def test_registry_names_and_delegation():
    assert {"arith", "gsm8k", "math", "code", "format"} <= set(available_rewards())
    assert get_reward("gsm8k")("#### 72", "72") == 1.0
    assert get_reward("math")("\\boxed{72}", "72") == 1.0
    assert get_reward("code")("def f():\n    return 1", json.dumps(["assert f() == 1"])) == 1.0
    # arith is dash.tasks.arith.arith_reward: exact canonical number, then EOS.
    from dash.tasks.arith import arith_reward

    assert get_reward("arith") is arith_reward
    assert get_reward("arith")("553<eos>", "553") == 1.0
    with pytest.raises(KeyError, match="available"):
        get_reward("nope")


def test_register_custom_reward(monkeypatch):
    import dash.rewards as registry

    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))  # keep the global registry unchanged
    monkeypatch.setattr(registry, "_ANSWER_PARSERS", dict(registry._ANSWER_PARSERS))
    register_reward("test_len", lambda c, a: float(len(c) == int(a)))
    assert get_reward("test_len")("abc", "3") == 1.0
    assert get_answer_parser("test_len")("3") == "3"
    with pytest.raises(ValueError):
        register_reward("a+b", lambda c, a: 0.0)


def test_answer_parsers():
    assert get_answer_parser("arith")("042") == "42"
    assert get_answer_parser("arith")("-1") is None
    assert get_answer_parser("gsm8k")("text\n#### 1,000") == "1000"
    assert get_answer_parser("math")("\\boxed{\\frac12}") == "\\frac12"
    assert get_answer_parser("math+format")("\\boxed{1") is None
    code = json.loads(get_answer_parser("code")(json.dumps({"test_list": ["assert 1"], "test_imports": ["import os"]})))
    assert code == {"tests": ["assert 1"], "setup": "import os"}
    assert get_answer_parser("code")("[]") is None


def test_import_is_lazy():
    """`import dash.rewards` must not import transformers (arith) or the sandbox/sympy modules."""
    probe = "import sys, dash.rewards; print(sorted(m for m in ('dash.tasks.arith', 'transformers', " \
            "'dash.rewards.code', 'math_verify', 'sympy') if m in sys.modules))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
