"""Sums with a scratchpad: the built-in reasoning task on which RL has something to find that SFT did not teach.

Purpose: prompts like `07+42+13+88=` (3 to 5 two-digit operands) whose answer (`150`) the model may write at once
(`150<eos>`) or reach through a scratchpad of running sums whose length it chooses (`49+13=62+88=150<eos>`: each
step adds one operand). The reward checks the final number only, so many completions are correct. The SFT data comes
from a weaker demonstrator (the paper's SFT-H: traces that are correct but not the policy's own best route): it
writes the answer at once in half of its traces and the scratchpad in the other half (`chain_fraction`). For a
0.8M-parameter model a 4-term sum in one go is error-prone while each scratchpad step is one 2-3 digit addition, so
half of what the demonstrator shows is a route the model cannot execute. Supervised training imitates the
demonstrator's mix; RL can shift the policy to the route that earns reward.

Design limits:
- Operands are zero-padded to `digits` characters as in dash/tasks/arith.py; the number of terms varies, so prompts
  and completions have several lengths (the sampler and packing take that). Same 16-token alphabet and tiny model.
- Splits are seeded and disjoint (train never holds a test problem); the test split depends only on
  (digits, terms, seed, test_size). The demonstrator's route per training example is drawn from the same seed.
- The reward ignores the scratchpad's arithmetic: a wrong intermediate sum with the right final number scores 1,
  as a math reward checks only the boxed answer.

Departures from the paper: the paper's tasks are MATH/GSM8K with human SFT data; this is a CPU-sized stand-in whose
"human" is a demonstrator with a fixed route mix.

Run the tests: `python -m pytest tests/tasks -q`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dash.tasks.arith import ArithExample, finished_completion
from dash.tokenizer import EOS_TOKEN

# Offsets that keep the test, train and demonstrator draws on different random streams for one user seed.
_TEST_STREAM = 0x5C7E
_TRAIN_STREAM = 0x5C7A
_ROUTE_STREAM = 0x5C70

# A completion is running sums joined by '+' and '=' ending in the final number, or the number alone.
_COMPLETION = re.compile(r"(?:(?:[0-9]+[+=])*[0-9]+=)?([0-9]+)")


@dataclass(kw_only=True, slots=True)
class ScratchpadTaskConfig:
    """Which sums to generate, how to split them, and how the demonstrator writes its traces."""

    min_terms: int = 3
    """Fewest operands in a prompt."""
    max_terms: int = 5
    """Most operands in a prompt (each count is equally likely)."""
    digits: int = 2
    """Width of every operand (zero-padded)."""
    chain_fraction: float = 0.5
    """Share of the demonstrator's traces written with the scratchpad; the rest give the answer at once. At 0.5 the
    shipped warm start takes the scratchpad on 56% of held-out prompts (greedy) and is right 68% of the time that
    way, 7% at once (dash/assets/tiny-scratchpad-sft/warmstart.json, `greedy_routes`)."""
    seed: int = 0
    """Seed of the split and of the demonstrator's route per example."""
    train_size: int = 100_000
    """Training problems (SFT traces and RL prompts)."""
    test_size: int = 500
    """Held-out problems; 500 gives a standard error of about 2 points at 50% accuracy."""

    def __post_init__(self) -> None:
        for name in ("min_terms", "max_terms", "digits", "seed", "train_size", "test_size"):
            value = getattr(self, name)  # a float here would fail later, deep in random.randrange
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ScratchpadTaskConfig.{name} must be an int, got {value!r}")
        if not 2 <= self.min_terms <= self.max_terms <= 8:
            raise ValueError(f"ScratchpadTaskConfig needs 2 <= min_terms <= max_terms <= 8, got "
                             f"min_terms={self.min_terms}, max_terms={self.max_terms}")
        if not 1 <= self.digits <= 3:
            raise ValueError(f"ScratchpadTaskConfig.digits must be in [1, 3], got {self.digits!r}")
        if not 0.0 <= self.chain_fraction <= 1.0:
            raise ValueError(f"ScratchpadTaskConfig.chain_fraction must be in [0, 1], got {self.chain_fraction}")
        if self.train_size < 0 or self.test_size < 0:
            raise ValueError(f"ScratchpadTaskConfig sizes must be >= 0, got train_size={self.train_size} "
                             f"test_size={self.test_size}")
        if self.test_size >= self.num_problems:  # the test draw, or the train draw that skips test problems, never ends
            raise ValueError(f"ScratchpadTaskConfig.test_size={self.test_size} must be below the "
                             f"{self.num_problems} distinct problems of {self.min_terms}-{self.max_terms} terms at "
                             f"digits={self.digits}, leaving problems for the train split")

    @property
    def num_problems(self) -> int:
        """Distinct prompts: operand tuples of every allowed length."""
        return sum(10 ** (self.digits * n) for n in range(self.min_terms, self.max_terms + 1))

    @property
    def max_prompt_len(self) -> int:
        """Characters (= tokens) of the longest prompt: operands, '+' between them, the trailing '='."""
        return self.max_terms * (self.digits + 1)

    @property
    def max_new_tokens(self) -> int:
        """Generation budget that fits the longest scratchpad: one '+operand=sum' per step after the first, EOS."""
        sum_width = len(str(self.max_terms * (10**self.digits - 1)))
        first = sum_width  # the first partial sum (a+b)
        steps = (self.max_terms - 2) * (1 + self.digits + 1 + sum_width)  # "+c=" then the new sum
        return first + steps + 1


def direct_solution(operands: tuple[int, ...]) -> str:
    """The answer at once: `150<eos>`."""
    return f"{sum(operands)}{EOS_TOKEN}"


def chain_solution(operands: tuple[int, ...], digits: int) -> str:
    """The scratchpad: the sum of the first two operands, then `+next=new sum` per remaining operand, EOS."""
    total = operands[0] + operands[1]
    parts = [str(total)]
    for value in operands[2:]:
        total += value
        parts.append(f"+{value:0{digits}d}={total}")
    return "".join(parts) + EOS_TOKEN


def make_problem(cfg: ScratchpadTaskConfig, operands: tuple[int, ...], chain: bool = False) -> ArithExample:
    """One problem; `chain` picks the demonstrator's route for its `solution`."""
    prompt = "+".join(f"{v:0{cfg.digits}d}" for v in operands) + "="
    solution = chain_solution(operands, cfg.digits) if chain else direct_solution(operands)
    return ArithExample(prompt=prompt, answer=str(sum(operands)), solution=solution)


def _draw(rng: random.Random, cfg: ScratchpadTaskConfig) -> tuple[int, ...]:
    n = rng.randint(cfg.min_terms, cfg.max_terms)
    return tuple(rng.randrange(10**cfg.digits) for _ in range(n))


def make_scratchpad_splits(cfg: ScratchpadTaskConfig) -> tuple[list[ArithExample], list[ArithExample]]:
    """Deterministic, disjoint (train, test) lists; each train example carries the demonstrator's trace. Test
    examples carry the direct trace (only their prompt and answer are used)."""
    test_rng = random.Random(cfg.seed * 1_000_003 + _TEST_STREAM)
    test_ops: dict[tuple[int, ...], None] = {}
    while len(test_ops) < cfg.test_size:  # the space (>= 10**6 sums of 3+ terms at 2 digits) dwarfs the sizes
        test_ops.setdefault(_draw(test_rng, cfg))
    train_rng = random.Random(cfg.seed * 1_000_003 + _TRAIN_STREAM)
    route_rng = random.Random(cfg.seed * 1_000_003 + _ROUTE_STREAM)
    train = []
    while len(train) < cfg.train_size:
        ops = _draw(train_rng, cfg)
        if ops in test_ops:
            continue
        train.append(make_problem(cfg, ops, chain=route_rng.random() < cfg.chain_fraction))
    return train, [make_problem(cfg, ops) for ops in test_ops]


def scratchpad_reward(completion_text: object, answer: object) -> float:
    """1.0 iff the completion, cut at its first EOS, is one number or digits joined by '+'/'=' ending in
    '=number', and that final number is exactly the answer (canonical, no leading zeros); else 0.0. No EOS
    (truncated) scores 0. Never raises."""
    parts = finished_completion(completion_text, answer)
    match = _COMPLETION.fullmatch(parts[0]) if parts is not None else None
    return 1.0 if match is not None and match.group(1) == parts[1] else 0.0


def uses_scratchpad(completion_text: str) -> bool:
    """Whether a completion took the scratchpad route (wrote an intermediate sum before its final number)."""
    return "=" in completion_text.partition(EOS_TOKEN)[0]


def route_stats(completions: list[str], answers: list[str]) -> dict:
    """Which route the completions took and how often each was right: scratchpad share, accuracy through the
    scratchpad, accuracy at once (0.0 for a route no completion took)."""
    if len(completions) != len(answers) or not completions:
        raise ValueError(f"route_stats needs equal, non-zero numbers of completions and answers, got "
                         f"{len(completions)} / {len(answers)}")
    chain = [uses_scratchpad(c) for c in completions]
    right = [scratchpad_reward(c, a) for c, a in zip(completions, answers)]
    n_chain = sum(chain)
    n_direct = len(chain) - n_chain
    return {"scratchpad_share": n_chain / len(chain),
            "acc_scratchpad": sum(r for r, c in zip(right, chain) if c) / n_chain if n_chain else 0.0,
            "acc_at_once": sum(r for r, c in zip(right, chain) if not c) / n_direct if n_direct else 0.0}
