"""The rule a learning claim must pass: "RL beats the supervised control" only over seeds, by more than the noise.

An RL run's gain from an SFT warm start can be annealing (any further training at a small lr helps) rather than
learning from reward. The control is continued supervised training from the same start, at the same lr and for the
same steps. Per seed s, with p1 = RL's and p2 = the control's held-out accuracy at the end over the same n prompts:

    d_s  = p1 - p2
    se_s = sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)      (binomial standard error of the difference)

The claim holds only when K >= MIN_SEEDS seeds were run and d_s > Z * se_s for every one of them; the mean d over
seeds is reported beside the verdict. The two evaluations are treated as independent (they are not: both score the
same prompts, which makes this se an over-estimate when the arms err on the same prompts, so the rule errs towards
"does not hold").

    from learning_claim import learning_claim
    claim = learning_claim([(0.62, 0.55), (0.60, 0.51), (0.64, 0.56)], n=500)   # claim["holds"], claim["mean_d"]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

MIN_SEEDS = 3  # fewer seeds cannot tell a lucky seed from a real effect
Z = 2.0  # d must exceed two standard errors on every seed (a one-sided test at ~2% per seed)
RULE = (f"RL beats the supervised control only if K >= {MIN_SEEDS} seeds and, for every seed, d = acc(RL) - "
        f"acc(supervised) at the end > {Z:g} se, se = sqrt(p1(1-p1)/n + p2(1-p2)/n) over the n held-out prompts")


def diff_se(p1: float, p2: float, n: int) -> float:
    """Standard error of p1 - p2, two accuracies each measured on n prompts."""
    return math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)


def learning_claim(pairs: Sequence[tuple[float, float]], n: int) -> dict:
    """Apply the rule to per-seed end accuracies `pairs` = [(acc RL, acc supervised), ...] over `n` held-out prompts.

    Returns {"holds": bool, "seeds": K, "mean_d": float | None, "rows": [{"rl", "supervised", "d", "se", "beats"}],
    "why": one sentence, "rule": RULE}. Raises ValueError on an accuracy outside [0, 1] or n < 1.
    """
    if n < 1:
        raise ValueError(f"learning_claim: n (held-out prompts) must be >= 1, got {n}")
    rows = []
    for i, (p1, p2) in enumerate(pairs):
        if not (0.0 <= p1 <= 1.0 and 0.0 <= p2 <= 1.0):
            raise ValueError(f"learning_claim: seed {i}'s accuracies must be in [0, 1], got ({p1}, {p2})")
        d, se = p1 - p2, diff_se(p1, p2, n)
        rows.append({"rl": p1, "supervised": p2, "d": d, "se": se, "beats": d > Z * se})
    k = len(rows)
    wins = sum(r["beats"] for r in rows)
    holds = k >= MIN_SEEDS and wins == k
    if k < MIN_SEEDS:
        why = f"only {k} seed(s), the rule needs >= {MIN_SEEDS}"
    elif holds:
        why = f"d > {Z:g} se on all {k} seeds"
    else:
        why = f"d > {Z:g} se on {wins} of {k} seeds"
    return {"holds": holds, "seeds": k, "mean_d": statistics.fmean(r["d"] for r in rows) if rows else None,
            "rows": rows, "why": why, "rule": RULE}
