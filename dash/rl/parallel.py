"""The parallel strategy of one RL step, behind one object: `replica` (DDP) or `sharded` (FSDP2).

    parallel = Parallel(model, dist_info)
    lo, hi = parallel.share(len(examples))        # this rank's prompts
    with parallel.generation(): sample(...)        # sharded: the full weights, gathered once for the whole phase
    counts = parallel.sum(local_counts)            # one collective for the step's counts
    plans, pads = parallel.pad(plans, device)      # sharded: the same micro-batch count on every rank
    non_finite = parallel.sync_gradients(optimizer, non_finite, average)   # before clipping and the optimizer step

The step's phases (dash/rl/phases.py) ask these questions and never test the mode themselves. One process (no
torchrun) is the replica strategy with a world of one, where every call is a no-op; a model that was sharded
(`shard_model`) is the sharded one, whatever the world size. Why two modes and what each costs: dash/rl/distributed.py
(replicas, one flat gradient all-reduce per update) and dash/rl/fsdp.py (shards, per-layer collectives in every
micro-batch, padding micro-batches).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from dash.rl.distributed import DistInfo, all_reduce_grads, all_reduce_sum, shard_range
from dash.rl.fsdp import gathered, is_sharded, pad_plans, reshard_all
from dash.rl.optim import gradient_tensors


class Parallel:
    """How one step's sampling, counts and gradients are split over and joined across the torchrun ranks.

    Attributes:
        model: the policy (an FSDP2 module when sharded).
        info: rank and world size (DistInfo() for one process).
        sharded: True under `train.parallel: fsdp` with a sharded model; False for replicas.
    """

    def __init__(self, model: torch.nn.Module, info: DistInfo | None = None):
        self.model = model
        self.info = info or DistInfo()
        self.sharded = is_sharded(model)

    def share(self, num_prompts: int) -> tuple[int, int]:
        """[lo, hi) of the step's prompts this rank samples and trains on; prompt k keeps its one-process seed."""
        return shard_range(num_prompts, self.info)

    def generation(self) -> AbstractContextManager:
        """Full weights for the body (sharded: one all-gather for the whole generation phase; replica: a no-op)."""
        return gathered(self.model)

    def sum(self, values: list) -> list:
        """Element-wise sum over ranks (fp64, exact for counts); the values unchanged on one process."""
        return all_reduce_sum(values, self.info)

    def pad(self, plans: list[list[tuple]], device: torch.device) -> tuple[list[list[tuple]], int]:
        """Sharded: every rank runs the same number of micro-batches per mini-batch, FSDP's collectives being per
        micro-batch; the shorter plans get zero-weight (pad, None) entries. Returns (plans, pads added here)."""
        if not self.sharded:
            return plans, 0
        return pad_plans(plans, self.info, device)

    def sync_gradients(self, optimizer: torch.optim.Optimizer, non_finite: int, average: bool) -> int:
        """Joins the update's gradients over ranks; returns the non-finite loss count over all ranks.

        sharded: FSDP reduce-scattered the gradients during backward; free the full copies a forward left (so the
        next forward gathers the updated shards) and sum the counts. replica under torchrun: one flat all-reduce of
        every gradient with the count riding along; `average` (the paper normaliser) divides by the world size as
        DDP does. One process: nothing to join.
        """
        if self.sharded:
            reshard_all(self.model)
            return int(all_reduce_sum([float(non_finite)], self.info)[0])
        if self.info.enabled:
            params = gradient_tensors(optimizer, self.model)
            return int(all_reduce_grads(params, self.info, [float(non_finite)], average)[0])
        return non_finite
