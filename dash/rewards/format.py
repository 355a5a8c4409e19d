"""Format reward.

Purpose: an optional shaping term that pays for the answer *shape*, not its correctness: exactly one complete
`\\boxed{}` (so the MATH extractor has one unambiguous answer) and, optionally, a finished generation (the EOS token
appears, i.e. the completion was not cut at the length limit). `dash.rewards.combine_rewards` adds it to an accuracy
reward with a weight, e.g. `combine_rewards({"math": 1.0, "format": 0.1})`.

Design limits: the EOS check needs the completion decoded with special tokens kept (as `dash.tasks.arith` does);
text after the first EOS is ignored (generation stops there; the rest is padding).

Departures from the paper: the paper's code defines a format reward but trains with accuracy only, so the default
reward (`get_reward("math")`) has no format term; this module only exists as an option.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dash.rewards.math import BOX_COMMANDS, last_boxed

RewardFn = Callable[[str, str], float]


@dataclass(frozen=True, kw_only=True, slots=True)
class FormatRewardConfig:
    """Which format rules must hold for the format reward to pay 1.0."""

    require_single_boxed: bool = True
    """Exactly one `\\boxed{}`/`\\fbox{}` in the completion, closed and non-empty."""
    require_eos: bool = False
    """The completion contains `eos_token` (it finished instead of being truncated)."""
    eos_token: str | None = None
    """EOS as text, e.g. "<|endoftext|>"; required when require_eos is set."""

    def __post_init__(self) -> None:
        if self.require_eos and not self.eos_token:
            raise ValueError("FormatRewardConfig.require_eos needs eos_token (the EOS token as decoded text)")
        if not (self.require_single_boxed or self.require_eos):
            raise ValueError("FormatRewardConfig: enable at least one rule (require_single_boxed or require_eos)")


def count_boxed(text: str) -> int:
    """Number of `\\boxed`/`\\fbox` commands in the text (complete or not)."""
    return sum(text.count(command) for command in BOX_COMMANDS)


def format_reward(completion: str, answer: str = "", *, cfg: FormatRewardConfig | None = None) -> float:
    """1.0 if every enabled rule of `cfg` holds, else 0.0. `answer` is unused (same signature as other rewards)."""
    cfg = cfg or FormatRewardConfig()
    text = completion
    if cfg.require_eos:
        text, found, _ = completion.partition(cfg.eos_token)
        if not found:
            return 0.0
    if cfg.require_single_boxed:
        boxed = last_boxed(text)
        if count_boxed(text) != 1 or boxed is None or not boxed.strip():
            return 0.0
    return 1.0
