"""Verifiable rewards: one interface, `fn(completion: str, answer: str) -> float`, and a registry by name.

Names: `arith` (the built-in task, `dash.tasks.arith.arith_reward`), `gsm8k` (`#### n`), `math` (`\\boxed{}`, the
paper's reward), `code` (run the program against the row's tests in a sandbox), `format` (one `\\boxed{}`; an
option, not in the paper's training reward). `get_reward("math+format")` sums rewards with weight 1 each;
`combine_rewards` takes explicit weights. Each name also has an answer parser used by `dash.data` to check (and
canonicalise) the gold answer of every row when loading: `get_answer_parser(name)(raw) -> str | None`.

Rewards are imported lazily (module:attribute strings), so `import dash.rewards` is cheap and does not pull in
transformers (arith) or sympy (math_verify). Wrap any reward in `SafeReward` for the timeout / exception guard.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

from dash.rewards.safe_call import RewardStats, SafeReward

RewardFn = Callable[[str, str], float]
AnswerParser = Callable[[object], "str | None"]

# name -> "module:attribute" of the reward function, resolved on first use.
_REWARDS: dict[str, str | RewardFn] = {
    "arith": "dash.tasks.arith:arith_reward",
    "gsm8k": "dash.rewards.gsm8k:gsm8k_reward",
    "math": "dash.rewards.math:math_reward",
    "code": "dash.rewards.code:code_reward",
    "format": "dash.rewards.format:format_reward",
}
_ANSWER_PARSERS: dict[str, str | AnswerParser] = {
    "arith": "dash.rewards:_parse_plain",
    "gsm8k": "dash.rewards.gsm8k:parse_gsm8k_answer",
    "math": "dash.rewards.math:parse_math_answer",
    "code": "dash.rewards:_parse_code",
    "format": "dash.rewards:_parse_any",
}


def _resolve(target: str | Callable) -> Callable:
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def available_rewards() -> list[str]:
    return sorted(_REWARDS)


def register_reward(name: str, fn: RewardFn, answer_parser: AnswerParser | None = None) -> None:
    """Add a reward under `name` (and optionally its answer parser; default: any non-empty string)."""
    if not name or "+" in name:
        raise ValueError(f"reward name must be non-empty and without '+', got {name!r}")
    _REWARDS[name] = fn
    _ANSWER_PARSERS[name] = answer_parser or _parse_any


def _check(name: str) -> None:
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`; "a+b" gives the sum of rewards a and b."""
    if "+" in name:
        from dash.rewards.format import combine_rewards

        return combine_rewards({part.strip(): 1.0 for part in name.split("+")})
    _check(name)
    return _resolve(_REWARDS[name])


def get_answer_parser(name: str) -> AnswerParser:
    """The gold-answer parser of reward `name` (for "a+b", the parser of a): raw field -> answer string or None."""
    name = name.split("+")[0].strip()
    _check(name)
    return _resolve(_ANSWER_PARSERS[name])


def _parse_any(raw: object) -> str | None:
    return raw if isinstance(raw, str) and raw.strip() else None


def _parse_plain(raw: object) -> str | None:
    """arith answers: a non-negative integer, given as a string or an int."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip().isascii() or not raw.strip().isdigit():
        return None
    return str(int(raw))  # canonical form, as arith_reward compares strings exactly


def _parse_code(raw: object) -> str | None:
    """code answers: anything `parse_code_tests` understands, passed on as a JSON string."""
    from dash.rewards.code import parse_code_tests

    tests = parse_code_tests(raw)
    return None if tests is None else json.dumps({"tests": list(tests.tests), "setup": tests.setup})


__all__ = [
    "AnswerParser",
    "RewardFn",
    "RewardStats",
    "SafeReward",
    "available_rewards",
    "get_answer_parser",
    "get_reward",
    "register_reward",
]
