"""GSM8K reward: the number after the last `#### ` in the completion, compared numerically to the gold answer.

Purpose: the verifiable reward for GSM8K-style data, whose reference solutions end in `#### 72`. 1.0 if the
completion's final answer equals the gold number, else 0.0.

Extraction, in order (the first that yields a number wins):
1. the first number after the last `####` (the GSM8K convention);
2. the last `\\boxed{}` if `accept_boxed` (a model RL-trained on MATH answers GSM8K in boxes, as in the paper's eval);
3. the last number anywhere in the text, only if `last_number_fallback` (off by default: it rewards a model for
   ending with any number, e.g. an intermediate result, which is easy to game).
Numbers are cleaned of `$`, thousands commas, `%` and trailing zeros of decimals ("$1,200.00" == "1200"), then
compared as exact rationals, so "0.5" == "1/2" and "72" == "72.0".

Design limits: the gold answer may be the full GSM8K solution (text ending in `#### n`) or the bare number; a gold
field with neither is unparsable (`parse_gsm8k_answer` returns None, and dash.data skips the row).

Departures from the paper: none known; the paper does not say how it scored GSM8K beyond accuracy.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from dash.rewards.math import last_boxed

_MARKER = "####"
# A number as people write it: optional sign and $, digits with optional thousands commas, optional decimals, or
# a simple fraction. Commas are only accepted in groups of three so "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_GROUPED = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass(frozen=True, kw_only=True, slots=True)
class GSM8KRewardConfig:
    """Which parts of a completion may carry the final answer."""

    accept_boxed: bool = True
    """Also accept `\\boxed{n}` when there is no `####` answer."""
    last_number_fallback: bool = False
    """Use the last number in the text when nothing else is found (lenient, gameable; off by default)."""


def to_number(text: str) -> Fraction | None:
    """Exact value of one written number ("$1,234.50", "-3", "1/2", ".5"), or None if it is not one."""
    s = text.strip().replace("$", "").replace(" ", "").rstrip("%").rstrip(".")
    if "," in s:  # only thousands groups: "1,2" is a list, not 12
        if not _GROUPED.fullmatch(s):
            return None
        s = s.replace(",", "")
    if s.startswith("-."):
        s = "-0" + s[1:]
    elif s.startswith("."):
        s = "0" + s
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _first_number(text: str) -> Fraction | None:
    m = _NUMBER.search(text)
    return to_number(m.group(0)) if m else None


def _last_number(text: str) -> Fraction | None:
    found = _NUMBER.findall(text)
    return to_number(found[-1]) if found else None


def extract_gsm8k_answer(completion: str, *, cfg: GSM8KRewardConfig | None = None) -> Fraction | None:
    """The final numeric answer of a completion (see the module docstring for the order), or None."""
    cfg = cfg or GSM8KRewardConfig()
    if _MARKER in completion:
        tail = completion.rsplit(_MARKER, 1)[1].lstrip().split("\n", 1)[0]
        value = _first_number(tail)
        if value is not None:
            return value
    if cfg.accept_boxed:
        boxed = last_boxed(completion)
        value = _first_number(boxed) if boxed is not None else None
        if value is not None:
            return value
    if cfg.last_number_fallback:
        return _last_number(completion)
    return None


def parse_gsm8k_answer(raw: str) -> str | None:
    """Gold answer from a dataset field (full solution ending in `#### n`, or a bare number) as a canonical string."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    if _MARKER in raw:
        value = _first_number(raw.rsplit(_MARKER, 1)[1])
    else:
        value = to_number(raw)
    if value is None:
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def gsm8k_reward(completion: str, answer: str, *, cfg: GSM8KRewardConfig | None = None) -> float:
    """1.0 if the completion's final number equals the gold answer (bare or `#### n` solution), else 0.0."""
    gold = parse_gsm8k_answer(answer)
    if gold is None:
        return 0.0
    pred = extract_gsm8k_answer(completion, cfg=cfg)
    return 1.0 if pred is not None and pred == Fraction(gold) else 0.0
