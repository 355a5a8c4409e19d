"""GSM8K reward: `#### n` answers, number cleaning, boxed and last-number fallbacks."""

from fractions import Fraction

import pytest

from dash.rewards.gsm8k import GSM8KRewardConfig, extract_gsm8k_answer, gsm8k_reward, parse_gsm8k_answer, to_number

GOLD_SOLUTION = "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "text,value",
    [("72", 72), ("$1,234.50", Fraction(246900, 200)), ("-3", -3), ("1/2", Fraction(1, 2)), (".5", Fraction(1, 2)),
     ("72.0", 72), ("15%", 15), ("72.", 72), ("1,2", None), ("abc", None), ("", None)],
)  # fmt: skip
def test_to_number(text, value):
    assert to_number(text) == value


def test_marker_answers():
    assert gsm8k_reward("Some work.\n#### 72", GOLD_SOLUTION) == 1.0
    assert gsm8k_reward("#### $1,250.00", "1250") == 1.0
    assert gsm8k_reward("#### 72.0 clips", "72") == 1.0
    assert gsm8k_reward("#### 0.5", "1/2") == 1.0
    assert gsm8k_reward("#### 71", GOLD_SOLUTION) == 0.0
    # The last marker wins, and a number after it on the same line is the answer.
    assert gsm8k_reward("#### 3\nno wait\n#### The answer is 72", "72") == 1.0


def test_boxed_answers_are_accepted_unless_disabled():
    assert gsm8k_reward("so the answer is \\boxed{72}", "72") == 1.0
    assert gsm8k_reward("so the answer is \\boxed{72}", "72", cfg=GSM8KRewardConfig(accept_boxed=False)) == 0.0


def test_last_number_fallback_only_if_configured():
    text = "She sold 48 + 24 = 72 clips."
    assert gsm8k_reward(text, "72") == 0.0
    assert gsm8k_reward(text, "72", cfg=GSM8KRewardConfig(last_number_fallback=True)) == 1.0
    assert extract_gsm8k_answer("no numbers", cfg=GSM8KRewardConfig(last_number_fallback=True)) is None


def test_parse_gold_answers():
    assert parse_gsm8k_answer(GOLD_SOLUTION) == "72"
    assert parse_gsm8k_answer("#### 1,250") == "1250"
    assert parse_gsm8k_answer("-7") == "-7"
    assert parse_gsm8k_answer("0.5") == "1/2"
    assert parse_gsm8k_answer(18) == "18"
    assert parse_gsm8k_answer("She sold some clips.") is None
    assert parse_gsm8k_answer("#### many") is None
    assert parse_gsm8k_answer(None) is None
    assert gsm8k_reward("#### 5", "no number here") == 0.0
