"""Verifiable rewards: one interface, `fn(completion: str, answer: str) -> float`, and a registry by name.

Names: `arith` (the built-in task, `dash.tasks.arith.arith_reward`), `scratchpad` (the built-in reasoning task's
final number after an optional scratchpad, `dash.tasks.scratchpad.scratchpad_reward`), `gsm8k` (`#### n`), `math` (`\\boxed{}`, the
paper's reward), `code` (run the program against the row's tests in a sandbox), `format` (one `\\boxed{}`; an
option, not in the paper's training reward). `get_reward("math+format")` sums rewards with weight 1 each;
`combine_rewards` takes explicit weights. Each name also has an answer parser used by `dash.data` to check (and
canonicalise) the gold answer of every row when loading: `get_answer_parser(name)(raw) -> str | None`.

A term can also be the user's own function, `path/to/file.py:function` or `package.module:function`, in the
per-sample form above or in TRL's batch form `fn(prompts, completions, **columns)` (dash/rewards/user.py; loading it
runs the user's code). `get_reward` then gives a `RewardSum`, which `RewardScorer` (dash/rewards/scorer.py) calls.

Rewards are imported lazily (module:attribute strings), so `import dash.rewards` is cheap and does not pull in
transformers (arith) or sympy (math_verify). Wrap any reward in `SafeReward` for the timeout / exception guard.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping

from dash.rewards.safe_call import RewardStats, SafeReward
from dash.rewards.scorer import RewardScorer, RewardSum
from dash.rewards.user import LoadedReward, RewardSpecError, check_columns, describe, is_user_term, load_user_reward

RewardFn = Callable[[str, str], float]
AnswerParser = Callable[[object], "str | None"]

# name -> "module:attribute" of the reward function, resolved on first use.
_REWARDS: dict[str, str | RewardFn] = {
    "arith": "dash.tasks.arith:arith_reward",
    "scratchpad": "dash.tasks.scratchpad:scratchpad_reward",
    "gsm8k": "dash.rewards.gsm8k:gsm8k_reward",
    "math": "dash.rewards.math:math_reward",
    "code": "dash.rewards.code:code_reward",
    "format": "dash.rewards.format:format_reward",
}
_ANSWER_PARSERS: dict[str, str | AnswerParser] = {
    "arith": "dash.rewards:_parse_plain",
    "scratchpad": "dash.rewards:_parse_plain",
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


def _load_term(term: str) -> LoadedReward:
    if is_user_term(term):
        return load_user_reward(term)
    _check(term)
    fn = _resolve(_REWARDS[term])
    try:  # a registered function may be in TRL form too
        return describe(fn, f"reward {term!r}")
    except RewardSpecError:  # unreadable signature: the registry's contract is fn(completion, answer)
        return LoadedReward(fn, "sample", f"reward {term!r}")


def get_reward(name: str) -> RewardFn | RewardSum:
    """The reward `name`: a registered name, `file.py:function` or `package.module:function`; "a+b" sums a and b.
    A plain `fn(completion, answer)` when every term is per-sample, else a `RewardSum` (for `RewardScorer`)."""
    terms = [part.strip() for part in name.split("+")]
    loaded = [_load_term(term) for term in terms]
    sample_terms = [term for term, r in zip(terms, loaded) if r.form == "sample"]
    if len(sample_terms) == 1:
        per_sample = loaded[terms.index(sample_terms[0])].fn
    elif sample_terms:
        per_sample = combine_rewards({term: 1.0 for term in sample_terms})
    else:
        per_sample = None
    batch = tuple(r for r in loaded if r.form == "batch")
    return RewardSum(per_sample, batch, name) if batch else per_sample


def combine_rewards(weights: Mapping[str | RewardFn, float]) -> RewardFn:
    """A reward that is the weighted sum of others, given by registry name or as functions.

    Example: `combine_rewards({"math": 1.0, "format": 0.1})` pays 1.1 for a correct, well-formed answer.
    """
    if not weights:
        raise ValueError("combine_rewards needs at least one reward")
    parts = [(get_reward(k) if isinstance(k, str) else k, float(w)) for k, w in weights.items()]
    batch = [k for (fn, _), k in zip(parts, weights) if not callable(fn)]  # a RewardSum: TRL form, not per-sample
    if batch:
        raise ValueError(f"combine_rewards: {batch} are TRL-form (batch) rewards; sum them with get_reward('a+b')")

    def combined(completion: str, answer: str) -> float:
        return sum(w * fn(completion, answer) for fn, w in parts)

    combined.__name__ = "+".join(k if isinstance(k, str) else getattr(k, "__name__", "fn") for k in weights)
    return combined


def check_reward_spec(name: str) -> None:
    """RewardSpecError unless every term of `name` is a registered name or a loadable user function (which this
    imports: start-up errors name the file, the function and what is wrong). Built-ins are not imported here."""
    for term in (part.strip() for part in name.split("+")):
        if is_user_term(term):
            load_user_reward(term)
        elif term not in _REWARDS:
            raise RewardSpecError(f"{term!r} is not one of {available_rewards()} (a function of yours: "
                                  "path/to/file.py:function or package.module:function)")


def check_reward_columns(name: str, examples: list, source: str) -> None:
    """RewardSpecError if a TRL-form term of reward `name` needs a dataset column that a row of `source` lacks."""
    reward = get_reward(name)
    if isinstance(reward, RewardSum):
        check_columns(reward.batch, examples, source)


def get_answer_parser(name: str) -> AnswerParser:
    """The gold-answer parser of reward `name` (for "a+b", the parser of the first registered name among a, b; a user
    function alone: any non-empty string): raw field -> answer string or None."""
    names = [part.strip() for part in name.split("+") if not is_user_term(part.strip())]
    if not names:
        return _parse_any
    _check(names[0])
    return _resolve(_ANSWER_PARSERS[names[0]])


def _parse_any(raw: object) -> str | None:
    return raw if isinstance(raw, str) and raw.strip() else None


def _parse_plain(raw: object) -> str | None:
    """arith and scratchpad answers: a non-negative integer, given as a string or an int."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip().isascii() or not raw.strip().isdigit():
        return None
    return str(int(raw))  # canonical form, as arith_reward compares strings exactly


def _parse_code(raw: object) -> str | None:
    """code answers: anything `parse_code_tests` understands, passed on as a JSON string."""
    # resolved like the registry's rewards, on first use: `import dash.rewards` stays without the sandbox modules
    tests = _resolve("dash.rewards.code:parse_code_tests")(raw)
    return None if tests is None else json.dumps({"tests": list(tests.tests), "setup": tests.setup})


__all__ = [
    "AnswerParser",
    "RewardFn",
    "RewardScorer",
    "RewardSpecError",
    "RewardStats",
    "RewardSum",
    "SafeReward",
    "available_rewards",
    "check_reward_columns",
    "combine_rewards",
    "check_reward_spec",
    "get_answer_parser",
    "get_reward",
    "register_reward",
]
