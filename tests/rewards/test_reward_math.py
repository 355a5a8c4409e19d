"""MATH reward: boxed extraction (paper rule), the string normaliser, numeric equivalence, optional math_verify."""

import pytest

import dash.rewards.math as math_mod
from dash.rewards.math import (
    MathRewardConfig,
    extract_math_answer,
    last_boxed,
    math_equiv,
    math_reward,
    normalize_math_answer,
    parse_math_answer,
)


@pytest.fixture
def no_math_verify(monkeypatch):
    """Force the string/numeric fallback even where math_verify is installed."""
    monkeypatch.setattr(math_mod, "_override_math_verify", False)


EQUIVALENT = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),  # \dfrac / \tfrac
    ("\\tfrac12", "\\frac{1}{2}"),  # brace-less shorthand
    ("0.5", "\\frac12"),  # numeric equivalence
    ("1/2", "\\frac{1}{2}"),  # a/b
    (".5", "1/2"),
    ("-\\frac{3}{6}", "-0.5"),
    ("\\frac{-1}{2}", "-\\frac12"),
    ("\\left( 1, 2 \\right)", "(1,2)"),  # \left / \right and spacing
    ("10\\!000", "10000"),  # \! thin space
    ("1\\,000", "1000"),
    ("90^\\circ", "90"),  # degrees
    ("90^{\\circ}", "90"),
    ("\\$5", "5"),  # dollars
    ("$5$", "5"),
    ("5\\text{ cm}^2", "5"),  # units in \text{}
    ("12 \\mbox{ inches}", "12"),
    ("\\text{(A)}", "(A)"),  # a lone \text{} is the answer itself
    ("1,000", "1000"),  # thousands commas
    ("1{,}000{,}000", "1000000"),
    ("5.0", "5"),  # trailing .0
    ("5.", "5"),
    ("50\\%", "50"),  # percent
    ("x = 3", "3"),  # short left-hand side
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\(3\\)", "3"),
    ("\u22123", "-3"),  # typeset minus sign
]
DIFFERENT = [
    ("3", "4"),
    ("0.333", "\\frac{1}{3}"),  # exact rationals only: a rounded decimal is not the fraction
    ("(1,234)", "(1234)"),  # a tuple is not a number with a thousands comma
    ("1e999999999", "1"),  # a huge exponent is not evaluated (would hang), just compared as text
    ("", "1"),
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_normaliser_equivalences(pred, gold, no_math_verify):
    assert math_equiv(pred, gold), (normalize_math_answer(pred), normalize_math_answer(gold))
    assert math_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", DIFFERENT)
def test_normaliser_keeps_different_answers_apart(pred, gold, no_math_verify):
    assert not math_equiv(pred, gold)


def test_last_boxed_variants():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\fbox{a{b}c}") == "a{b}c"
    assert last_boxed("so $\\boxed 5$.") == "5"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("no box") is None


def test_extraction_uses_the_paper_window_of_last_lines():
    early_box = "\\boxed{7}\na\nb\nc\nd"
    assert extract_math_answer(early_box) is None  # 5 lines: the box is outside the last 4
    assert extract_math_answer(early_box, last_lines=None) == "7"
    # Trailing blank lines do not push the box out of the window.
    assert extract_math_answer("work\n\\boxed{2}\n\n\n\n\n") == "2"


def test_math_reward_end_to_end(no_math_verify):
    assert math_reward("We compute... The answer is $\\boxed{0.5}$.", "\\frac{1}{2}") == 1.0
    assert math_reward("The answer is $\\boxed{0.5}$.", "$\\frac{1}{4}+\\frac{1}{4}=\\boxed{\\frac12}$") == 1.0
    assert math_reward("The answer is 0.5", "\\frac{1}{2}") == 0.0  # no box
    assert math_reward("\\boxed{0.5", "\\frac{1}{2}") == 0.0  # truncated box
    assert math_reward("\\boxed{3}", "\\boxed{") == 0.0  # unusable gold
    cfg = MathRewardConfig(last_lines=None)
    assert math_reward("\\boxed{4}\n1\n2\n3\n4\n5", "4", cfg=cfg) == 1.0


def test_parse_math_answer():
    assert parse_math_answer("so $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert parse_math_answer(" 12 ") == "12"
    assert parse_math_answer("\\boxed{5") is None
    assert parse_math_answer("\\boxed{ }") is None
    assert parse_math_answer("") is None
    assert parse_math_answer(None) is None


def test_config_validation():
    with pytest.raises(ValueError):
        MathRewardConfig(last_lines=0)
    with pytest.raises(ValueError):
        MathRewardConfig(math_verify="sometimes")


def test_fallback_without_math_verify(no_math_verify):
    # Symbolically equal, not string/numerically equal: only a sympy checker can see it.
    assert math_reward("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 0.0
    with pytest.raises(ImportError, match="pip install math-verify"):
        math_equiv("2\\sqrt{2}", "\\sqrt{8}", use_math_verify="always")
    # `never` does not consult it even when present.
    assert not math_equiv("2\\sqrt{2}", "\\sqrt{8}", use_math_verify="never")


def test_with_math_verify_when_installed():
    pytest.importorskip("math_verify", reason="math-verify not installed (optional: pip install math-verify)")
    assert math_mod.math_verify_available()
    assert math_reward("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0
    assert math_reward("\\boxed{x^2+2x+1}", "(x+1)^2") == 1.0
    assert math_reward("\\boxed{3}", "\\sqrt{8}") == 0.0
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5", cfg=MathRewardConfig(math_verify="never")) == 1.0
