"""MATH reward: the last `\\boxed{}` / `\\fbox{}` of the completion, compared to the gold answer.

Purpose: the paper's verifiable reward for MATH. 1.0 if the boxed answer is equivalent to the gold one, else 0.0; a
completion with no (complete) box scores 0.0.

Equivalence, cheapest first, any one suffices:
1. string equality after `normalize_math_answer` (spacing, `\\left`/`\\right`, `\\dfrac`, degrees, `$`, `\\text{}`
   units, percent, thousands commas, `x = ` prefixes, `\\frac12`, `a/b`, trailing `.0`);
2. exact rational equality when both sides are plain numbers (`0.5`, `1/2`, `\\frac{1}{2}`, `-\\dfrac{3}{6}`);
3. `math_verify` (sympy based) when it is importable and `MathRewardConfig.math_verify` allows it.

Design limits: the normaliser is string based; it does not know that `\\sqrt{8}` is `2\\sqrt{2}` (math_verify does).
math_verify is called with its own signal-based timeouts disabled, because they would clobber the SIGALRM timer of
`dash.rewards.safe_call` and fail outside the main thread; wrap this reward in `SafeReward` to bound its time.

Departures from the paper: the paper's second judge is OlympiadBench's sympy `AutoScoringJudge`; here it is the
optional `math_verify`, so without it answers equal only symbolically score 0. The paper looks at the last 4 lines;
we strip trailing whitespace first, so blank lines at the end do not push the box out of the window.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

# The paper's extraction window: only the last lines are searched, so a box in the middle of a long derivation
# followed by more text is not taken as the final answer.
PAPER_LAST_LINES = 4
BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True, kw_only=True, slots=True)
class MathRewardConfig:
    """How the MATH reward extracts and compares answers."""

    last_lines: int | None = PAPER_LAST_LINES
    """Search for the box only in the last N lines (the paper: 4). None searches the whole completion."""
    math_verify: Literal["auto", "never", "always"] = "auto"
    """`auto` uses math_verify if importable; `always` raises ImportError if it is not; `never` skips it."""

    def __post_init__(self) -> None:
        if self.last_lines is not None and self.last_lines < 1:
            raise ValueError(f"MathRewardConfig.last_lines must be >= 1 or None, got {self.last_lines}")
        if self.math_verify not in ("auto", "never", "always"):
            raise ValueError(f"MathRewardConfig.math_verify must be auto|never|always, got {self.math_verify!r}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces allowed), or None if absent/unclosed.

    Also accepts the brace-less `\\boxed 5` form (content up to the next `$` or whitespace).
    """
    start, command = max((text.rfind(c), c) for c in BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.startswith(" "):
        token = rest.lstrip().split("$")[0].split()
        return token[0] if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None  # truncated generation: the box never closes


def extract_math_answer(completion: str, *, last_lines: int | None = PAPER_LAST_LINES) -> str | None:
    """The boxed answer of a completion, searched in its last `last_lines` lines (None: everywhere)."""
    text = completion.rstrip()
    if last_lines is not None:
        text = "\n".join(text.split("\n")[-last_lines:])
    return last_boxed(text)


def parse_math_answer(raw: str) -> str | None:
    """Gold answer from a dataset field: the boxed part of a full solution, else the field itself; None if unusable."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    if any(c in raw for c in BOX_COMMANDS):
        boxed = last_boxed(raw)
        return boxed if boxed and boxed.strip() else None
    return raw.strip()


# --- normaliser -------------------------------------------------------------------------------------------------
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\qquad", "\\quad", "~")
_DEGREES = ("^{\\circ}", "^\\circ", "\\circ", "\\degree", "°")
_TEXT_CMD = r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*"
_TRAILING_UNIT = re.compile(_TEXT_CMD + r"\{[^{}]*\}(?:\^\{?\d\}?)?$")
_TEXT_WRAPPED = re.compile(_TEXT_CMD + r"\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SHORT_LHS = re.compile(r"^[A-Za-z]\w?\s*=\s*(?=.)")  # "x = 5", "k=3" (one '=' only, checked below)
_FRAC_SHORTHAND = re.compile(r"\\frac(\d|\{[^{}]*\})(\d|\{[^{}]*\})")
_SQRT_SHORTHAND = re.compile(r"\\sqrt(\w)")
_INT_SLASH = re.compile(r"(-?\d+)/(\d+)")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d{1,3})?")  # exponent capped: 1e999999999 would hang
_LATEX_FRAC = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")


def _braced(group: str) -> str:
    return group if group.startswith("{") else "{" + group + "}"


def normalize_math_answer(answer: str) -> str:
    """Canonical string form of a MATH answer, so that notational variants compare equal as strings."""
    s = answer.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    s = s.replace("\n", "").replace("\\\\", "\\").replace("\u2212", "-")  # U+2212 is the typeset minus
    for token in _SPACING + _DEGREES:
        s = s.replace(token, "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)\.", "", s)  # invisible delimiters of one-sided \left. ... \right|
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # Units: a trailing \text{...} after some content is a unit ("5\text{ cm}^2"); a lone \text{...} is the answer.
    while _TRAILING_UNIT.search(s) and _TRAILING_UNIT.sub("", s).strip():
        s = _TRAILING_UNIT.sub("", s).rstrip()
    s = _TEXT_WRAPPED.sub(r"\1", s).replace("{,}", "")
    s = "".join(s.split())
    if _THOUSANDS.fullmatch(s):  # only a whole number: "(1,234)" might be a tuple and stays as is
        s = s.replace(",", "")
    if s.count("=") == 1 and _SHORT_LHS.match(s):
        s = _SHORT_LHS.sub("", s)
    s = _SQRT_SHORTHAND.sub(r"\\sqrt{\1}", s)
    s = _FRAC_SHORTHAND.sub(lambda m: "\\frac" + _braced(m.group(1)) + _braced(m.group(2)), s)
    s = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5"
    s = re.sub(r"^(-?\d+)\.0*$", r"\1", s)  # "5.0", "5." -> "5"
    s = _INT_SLASH.sub(r"\\frac{\1}{\2}", s) if _INT_SLASH.fullmatch(s) else s
    return s


def as_rational(normalized: str) -> Fraction | None:
    """The exact value of a normalised plain number ("0.5", "-3", "\\frac{1}{2}", "-\\frac{3}{6}"), else None."""
    try:
        if _NUMBER.fullmatch(normalized):
            return Fraction(normalized)
        m = _LATEX_FRAC.fullmatch(normalized)
        if m and _NUMBER.fullmatch(m.group(2)) and _NUMBER.fullmatch(m.group(3)):
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        pass
    return None


# --- optional math_verify backend (chosen once on first use; tests override `_override_math_verify`) ----------------
_override_math_verify: bool | None = None
_math_verify_module: object | None = None
_math_verify_checked = False


def math_verify_available() -> bool:
    """Whether the optional math_verify checker is importable (and not switched off by a test override)."""
    if _override_math_verify is False:
        return False
    return _load_math_verify() is not None


def _load_math_verify():
    global _math_verify_module, _math_verify_checked
    if not _math_verify_checked:  # import once: it pulls in sympy and antlr (~1 s)
        _math_verify_checked = True
        try:
            import math_verify  # optional dependency (extra `data`): only the math reward's checker needs it

            _math_verify_module = math_verify
        except ImportError:
            _math_verify_module = None
    return _math_verify_module


def _math_verify_equal(pred: str, gold: str) -> bool:
    mv = _load_math_verify()
    try:
        # Timeouts None: math_verify's SIGALRM timer would replace SafeReward's (see the module docstring).
        gold_p = mv.parse("\\boxed{" + gold + "}", parsing_timeout=None)
        pred_p = mv.parse("\\boxed{" + pred + "}", parsing_timeout=None)
        return bool(gold_p and pred_p and mv.verify(gold_p, pred_p, timeout_seconds=None))
    except Exception:  # noqa: BLE001 -- a checker bug must cost this sample its reward, not the run
        return False


def math_equiv(pred: str, gold: str, *, use_math_verify: Literal["auto", "never", "always"] = "auto") -> bool:
    """True if two extracted answers are equivalent (see the module docstring for the three checks)."""
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    ra, rb = as_rational(a), as_rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    if use_math_verify == "never":
        return False
    if not math_verify_available():
        if use_math_verify == "always":
            raise ImportError("MathRewardConfig.math_verify='always' needs math-verify: pip install math-verify")
        return False
    return _math_verify_equal(pred, gold)


def math_reward(completion: str, answer: str, *, cfg: MathRewardConfig | None = None) -> float:
    """1.0 if the completion's last boxed answer is equivalent to `answer` (gold, boxed or bare), else 0.0."""
    cfg = cfg or MathRewardConfig()
    pred = extract_math_answer(completion, last_lines=cfg.last_lines)
    gold = parse_math_answer(answer)
    if pred is None or gold is None:
        return 0.0
    return 1.0 if math_equiv(pred, gold, use_math_verify=cfg.math_verify) else 0.0
