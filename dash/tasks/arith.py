"""Synthetic verifiable arithmetic: the built-in tiny task (no download).

Purpose: prompts like `07+42*13=` whose answer (`553`) a ~0.8M-parameter model can learn on 2 CPU cores, with an
exact-answer reward so the RL loop has something verifiable to optimise. `TINY_MODEL_CONFIG` is the paired model.

Design limits:
- Operands are zero-padded to `digits` characters, so every prompt of one task has the same length (no padding when
  batching prompts). Answers are written canonically (no leading zeros) and never negative (only + and *).
- Splits are drawn from the full problem space by a seeded sampler. The test split depends only on
  (form, digits, seed, test_size), so changing `train_size` never changes the test set; train never contains a test
  problem. Determinism relies on Python's `random.Random` (stable across CPython 3 releases for `sample`).
- Difficulty knobs: `digits` (operand width) and `form` (expression shape). Measured on a 2-core CPU:
  3-digit `a+b` is too easy for RL (SFT ends near 100%); the default 2-digit `a+b*c` lands SFT at 20-60%.

Departures from the paper: the paper trains on MATH/GSM8K with Qwen2.5-0.5B; this task only makes the method runnable
and measurable on a CPU. Its reward is binary like the paper's.

Run the tests: `python -m pytest tests/tasks -q`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from dash.tokenizer import ARITH_ALPHABET, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

# Expression shapes: letters are operands (in order), the rest are operator characters of ARITH_ALPHABET.
# The function gives the value with the usual precedence (* before +).
FORMS: dict[str, Callable[..., int]] = {
    "a+b": lambda a, b: a + b,
    "a*b": lambda a, b: a * b,
    "a+b*c": lambda a, b, c: a + b * c,
    "a*b+c": lambda a, b, c: a * b + c,
}

# Offsets that keep the test and train samplers on different random streams for the same user seed.
_TEST_STREAM = 0x7E57
_TRAIN_STREAM = 0x7A1


@dataclass(kw_only=True, slots=True)
class ArithTaskConfig:
    """Which arithmetic problems to generate and how to split them."""

    form: str = "a+b*c"
    """Expression shape, a key of FORMS. More operands and '*' make the task harder."""
    digits: int = 2
    """Width of every operand (zero-padded). 2 gives operands 00..99."""
    seed: int = 0
    """Seed of the split sampler: same config, same examples, in the same order."""
    train_size: int = 100_000
    """Number of training problems (a few hundred SFT steps at batch 128 see well under one epoch)."""
    test_size: int = 500
    """Number of held-out problems; 500 gives a standard error of about 2 points at 30% accuracy."""

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"ArithTaskConfig.form={self.form!r} is not one of {sorted(FORMS)}")
        if not isinstance(self.digits, int) or self.digits < 1:
            raise ValueError(f"ArithTaskConfig.digits must be an int >= 1, got {self.digits!r}")
        if self.train_size < 0 or self.test_size < 0:
            raise ValueError(f"ArithTaskConfig sizes must be >= 0, got train={self.train_size} test={self.test_size}")
        if self.train_size + self.test_size > self.num_problems:
            raise ValueError(
                f"ArithTaskConfig: train_size + test_size = {self.train_size + self.test_size} exceeds the "
                f"{self.num_problems} distinct problems of form={self.form!r} digits={self.digits}"
            )

    @property
    def num_operands(self) -> int:
        return sum(ch.isalpha() for ch in self.form)

    @property
    def num_problems(self) -> int:
        """Size of the problem space: every operand takes 10**digits values."""
        return (10**self.digits) ** self.num_operands

    @property
    def prompt_len(self) -> int:
        """Characters (= tokens) in every prompt: operands, operators and the trailing '='."""
        return self.num_operands * self.digits + (len(self.form) - self.num_operands) + 1

    @property
    def max_answer_len(self) -> int:
        """Digits of the largest possible answer (all operands at their maximum)."""
        top = 10**self.digits - 1
        return len(str(FORMS[self.form](*([top] * self.num_operands))))

    @property
    def max_new_tokens(self) -> int:
        """Generation budget that fits any correct completion: the longest answer plus EOS."""
        return self.max_answer_len + 1


@dataclass(frozen=True, slots=True)
class ArithExample:
    """One problem.

    Attributes:
        prompt: the expression and '=', e.g. "07+42*13=".
        answer: the value as a canonical decimal string, e.g. "553".
        solution: the completion SFT trains on: answer followed by EOS_TOKEN, e.g. "553<eos>".
    """

    prompt: str
    answer: str
    solution: str


def make_example(cfg: ArithTaskConfig, operands: tuple[int, ...]) -> ArithExample:
    """Render one problem of `cfg.form` from its operand values."""
    values = iter(operands)
    prompt = "".join(f"{next(values):0{cfg.digits}d}" if ch.isalpha() else ch for ch in cfg.form) + "="
    answer = str(FORMS[cfg.form](*operands))
    return ArithExample(prompt=prompt, answer=answer, solution=answer + EOS_TOKEN)


def _operands(cfg: ArithTaskConfig, index: int) -> tuple[int, ...]:
    """Problem `index` in [0, num_problems) -> operand values (its base-10**digits digits)."""
    base = 10**cfg.digits
    out = []
    for _ in range(cfg.num_operands):
        index, value = divmod(index, base)
        out.append(value)
    return tuple(out)


def make_splits(cfg: ArithTaskConfig) -> tuple[list[ArithExample], list[ArithExample]]:
    """Deterministic, disjoint (train, test) example lists for `cfg`."""
    space = range(cfg.num_problems)
    # Two independent streams: the test draw sees only its own seed, so it is the same for any train_size.
    test_idx = random.Random(cfg.seed * 1_000_003 + _TEST_STREAM).sample(space, cfg.test_size)
    excluded = set(test_idx)
    # Over-draw by test_size so that after removing the (at most test_size) collisions enough indices remain.
    draw = random.Random(cfg.seed * 1_000_003 + _TRAIN_STREAM).sample(space, cfg.train_size + cfg.test_size)
    train_idx = [i for i in draw if i not in excluded][: cfg.train_size]
    train = [make_example(cfg, _operands(cfg, i)) for i in train_idx]
    test = [make_example(cfg, _operands(cfg, i)) for i in test_idx]
    return train, test


# Canonical non-negative integer: "0" or digits without a leading zero. ASCII only ([0-9], not \d, which would
# accept other scripts' digits that the tokenizer cannot even produce).
_CANONICAL_NUMBER = re.compile(r"0|[1-9][0-9]*")


def arith_reward(completion_text: object, answer: object) -> float:
    """Exact-answer reward: 1.0 iff the completion is exactly the answer, then EOS; else 0.0. Never raises.

    The rule, applied to the completion text decoded WITH special tokens kept (`skip_special_tokens=False`):
    1. Cut at the first EOS_TOKEN; text after it is ignored (generation stops at EOS; anything later is padding).
       No EOS at all means the model never finished (truncated), which scores 0.
    2. What precedes EOS must be one canonical number and nothing else: no spaces, signs, operators, other
       special tokens or leading zeros ("042" does not match "42"; "0" is fine). Training solutions are
       canonical, so this is plain exact match and cannot be gamed by padding the answer.
    3. That number must equal `answer` (a canonical decimal string or a non-negative int).
    Any other input (non-string completion, malformed answer) gives 0.0.
    """
    parts = finished_completion(completion_text, answer)
    return 1.0 if parts is not None and parts[0] == parts[1] else 0.0


def finished_completion(completion_text: object, answer: object) -> tuple[str, str] | None:
    """(the completion's text before its first EOS, the answer as a canonical decimal string), or None when the
    completion is not a string, has no EOS (truncated) or the answer is not a non-negative integer: the checks both
    built-in tasks' rewards start with."""
    if not isinstance(completion_text, str):
        return None
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not _CANONICAL_NUMBER.fullmatch(answer):
        return None
    head, found, _ = completion_text.partition(EOS_TOKEN)
    return (head, answer) if found else None


# The tiny Qwen2-shaped model, in HF config.json form (0.79M parameters, hidden 128, 4 layers).
# Vocabulary = the 3 specials + ARITH_ALPHABET = 16 tokens; ids match dash.tokenizer.build_arith_tokenizer().
# Both `rope_theta` and `rope_parameters` are given so transformers 4.x and 5.x style readers agree.
TINY_MODEL_CONFIG: dict = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": len(SPECIAL_TOKENS) + len(ARITH_ALPHABET),
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    # Longest task sequence is ~16 tokens (9-char prompt + 4-digit answer + EOS); 64 leaves room for harder forms.
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    # Std of the normal init (dash.rl.warmstart.build_tiny_model and HF both read it). HF's usual 0.02 is tuned
    # for wide models; at hidden 128 it left SFT at ~9% greedy after 2000 steps, 0.06 reached ~26% (0.1: ~14%).
    "initializer_range": 0.06,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 4,
    "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
    "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
    "torch_dtype": "float32",
}
