"""Built-in tasks that need no download. `arith`: the synthetic verifiable arithmetic task and its tiny model."""

from dash.tasks.arith import (
    FORMS,
    TINY_MODEL_CONFIG,
    ArithExample,
    ArithTaskConfig,
    arith_reward,
    make_example,
    make_splits,
)

__all__ = [
    "FORMS",
    "TINY_MODEL_CONFIG",
    "ArithExample",
    "ArithTaskConfig",
    "arith_reward",
    "make_example",
    "make_splits",
]
