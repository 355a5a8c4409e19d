"""The loss denominators ("normalisers") of a step, written where they are decided.

`dash_kernels.fused_policy_loss(..., normalizer=x)` divides per `loss_type` (see dash_kernels/reference.py):
grpo by (sequence length x x), bnpo/dapo and dr_grpo by x. Two policies choose x:

  * `global` (default): fixed once per optimizer step from ALL the step's samples, filtered ones included, so the
    update is the same however the survivors are packed or split over ranks, and with beta = 0 filtering leaves the
    gradient unchanged
    (a filtered sample's advantage is ~0): grpo x = S, bnpo/dapo x = the step's completion tokens, dr_grpo
    x = S * max_new_tokens. With PPO-Mini, "the step" is the mini-batch each optimizer step trains on.
  * `paper`: the paper's code: per micro-batch, the loss over its kept rows divided by (kept rows x max completion
    length), then by the number of accumulation steps K = ceil(S / micro_batch_size) (HF gradient accumulation).
    For the other loss types the same per-micro-batch rule: grpo x = kept rows * K, bnpo/dapo x = kept tokens * K.
    Under data parallelism the counts are each rank's own and gradients are averaged over ranks (as the paper's
    2-process DeepSpeed run does).
"""

from __future__ import annotations

import math


def global_normalizer(loss_type: str, num_samples: int, completion_tokens: int, max_new_tokens: int) -> float:
    """Denominator from the counts of ALL samples of one update (filtered ones included; summed over ranks)."""
    if loss_type == "grpo":
        return float(num_samples)
    if loss_type == "dr_grpo":
        return float(num_samples * max_new_tokens)
    return float(max(1, completion_tokens))  # bnpo, dapo


def paper_normalizer(loss_type: str, kept_rows: int, kept_tokens: int, max_new_tokens: int, num_samples: int,
                     micro_batch_size: int) -> float:
    accum_steps = math.ceil(num_samples / micro_batch_size)
    if loss_type == "grpo":
        return float(kept_rows * accum_steps)
    if loss_type == "dr_grpo":
        return float(kept_rows * max_new_tokens * accum_steps)
    return float(max(1, kept_tokens) * accum_steps)
