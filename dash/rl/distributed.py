"""Data parallelism under torchrun: replicas, a split of each step's prompts, one gradient all-reduce per update.

    torchrun --nproc_per_node 2 -m dash train --config configs/tiny.yaml

Each rank holds a full replica of the policy and runs its own in-process sampler on its contiguous share of the
step's prompts (a group's G samples stay on one rank, so advantages need no communication). Prompt k of the step keeps
the sampling seed it has in a single process, so W ranks draw exactly the completions one process would. Rewards,
filtering and packing are per rank. The loss normaliser is the global one, computed from all-reduced counts, and the
gradients are summed over ranks once per optimizer step, so the update equals the single-process update on the same
global batch.

Why one all-reduce per optimizer step instead of torch DDP's per-backward bucketed sync: after filtering, ranks hold
different numbers of micro-batches (possibly zero). Per-micro-batch collectives would force every rank to run as
many micro-batches as the busiest one (padding with zero-weight micro-batches) and in lockstep; a single sync after
local accumulation needs no padding and cannot deadlock, because every rank makes the same number of collective calls
per step (counts, gradients, metrics), whatever its share of work. What it gives up is overlapping the all-reduce
with the last backward, which matters on fast GPU interconnect only for large models. Measured on 2 CPU processes
(benchmarks/dp_sync.py, benchmarks/results/dp_sync.md), with the paper's 8-row micro-batches (10-39 per rank): a
synced, padded micro-batch loop (flat all-reduce or torch DDP) makes the training phase 1.56-1.64x slower; DDP with
no_sync is within noise of this design (0.87-1.04x). With DASH's packing (one micro-batch per rank) all are equal.
Imbalance is left as is: ranks wait for the slowest at the counts and gradient collectives, 5-7% of the step
(benchmarks/step_time.py --nproc 2). Rebalancing the kept samples across ranks (an all_gather of them, then a
token-balanced split) cut that wait by 2-4x but paid about as much for the exchange: 0.94-1.04x of the training phase.
Checkpoints are written by rank 0 (replicas are identical), so a run can resume with any world size.
`train.parallel: fsdp` shards the model instead (dash/rl/fsdp.py); the helpers here serve both modes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Ranks wait in their next collective while rank 0 alone evaluates and saves checkpoints: a long greedy evaluation
# (500 prompts x 2048 tokens on a large model) can outlast NCCL's default 10-minute timeout.
COLLECTIVE_TIMEOUT_MIN = 120


@dataclass(slots=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on CUDA nccl for CUDA tensors plus gloo for CPU ones: the step's counts and flags are all-reduced
    as small CPU tensors (all_reduce_sum / all_reduce_max), and an nccl-only group rejects any CPU collective."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the torchrun process group (see process_group_backend) when WORLD_SIZE > 1; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device),
                                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    return info


def shard_range(num_prompts: int, info: DistInfo) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of the step's prompts."""
    if num_prompts % info.world_size:
        raise ValueError(f"train.prompts_per_step={num_prompts} must be divisible by the world size "
                         f"{info.world_size} so every rank gets whole groups")
    per = num_prompts // info.world_size
    return info.rank * per, (info.rank + 1) * per


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of a list of floats over ranks (fp64 on CPU: exact for counts)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise max of a list of floats over ranks (FSDP: the micro-batch count every rank must run)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_grads(params: list[torch.Tensor], info: DistInfo, extras: list[float], average: bool) -> list[float]:
    """Sums (or averages) the `.grad` of every tensor in `params` (dash.rl.optim.gradient_tensors) over ranks in one
    flat all-reduce (a missing grad counts as zero); `extras` (e.g. non-finite loss counts) ride along in the same
    call and come back summed."""
    if not info.enabled:
        return extras
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = torch.cat(grads + [torch.tensor(extras, dtype=torch.float32, device=grads[0].device)])
    dist.all_reduce(flat)
    scale = 1.0 / info.world_size if average else 1.0
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = (flat[offset:offset + n] * scale).view_as(p).to(p.dtype)
        offset += n
    return flat[offset:].tolist()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_distributed(info: DistInfo, synchronize: bool = True) -> None:
    """Leaves the process group. `synchronize`: meet at a barrier first, so that a rank that finished early (e.g.
    rank 1, with less to save) does not tear down its side while a peer is still working; one 2-process CPU run of
    the test suite aborted in rank 1's teardown without it (once, on a loaded machine). False after an error, when a
    peer may be waiting in another collective and a barrier would hang."""
    if info.enabled and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
