"""FSDP2 (`train.parallel: fsdp`): parameters, gradients and AdamW state sharded over ranks; the full parameters are
gathered once per generation phase.

    torchrun --nproc_per_node 2 -m dash train --config configs/tiny.yaml --train.parallel=fsdp

Layout: `fully_shard` on every decoder layer, then on the root CausalLM (embedding, final norm, untied lm_head). Each
rank keeps 1/W of every parameter (a DTensor, Shard(0)), the gradient of that shard and its AdamW moments; the
optimizer steps on the shards. Runs on CPU with gloo in torch 2.13 (FSDP2's all_gather_single / reduce_scatter_single
work there; only its PREMUL_SUM reduction does not, see shard_model) and on CUDA with nccl (not run here).

Generation: the sampler (dash.engine) calls the layers' pieces (embed_tokens, project, o_proj, MLP) rather than
the layers' forward, so FSDP's per-forward hooks never fire for it, and an all-gather per layer per decode step would
be far too slow anyway. `gathered(model)` all-gathers every sharded module once, turns reshard-after-forward off for
the duration (the engine's log-prob recompute runs `forward_packed`, whose hooks would otherwise free the layers
mid-generation), and frees the full copies on exit: one all-gather of the model per generation phase.

Training is plain FSDP2 (ZeRO-3): a micro-batch's forward all-gathers each layer and frees it afterwards, backward
gathers it again and reduce-scatters its gradient. Those collectives are per micro-batch, so, unlike the DDP mode
(one flat all-reduce per optimizer step, dash/rl/distributed.py), every rank must run the same number of
micro-batches: the ranks agree on the largest count (one max all-reduce) and a rank with fewer runs zero-weight
padding micro-batches (one token, loss x 0) that join the collectives and add nothing to the gradient. A non-finite
loss is handled the same way (a zero-weight backward, then the whole update is skipped on every rank). Gradients are
summed over ranks (global normaliser) or averaged (paper normaliser) through FSDP's gradient divide factor.

Cost, measured on 2 CPU processes with the 0.8M-parameter tiny model (benchmarks/step_time.py --nproc 2): 0.28 s per
DASH step vs 0.14 s for DDP and 0.18 s for one process. Once gathered, the sampler runs at DDP's speed (profiled: 83
vs 79 ms a step); the gather itself, with the wait for the slower rank, takes ~20 ms. The rest is training (~2.5x
DDP's): per-layer gloo collectives in every micro-batch and optimizer steps on DTensors. FSDP is for models whose
gradients + AdamW state do not fit on one device next to the weights, not for speed at this size.

Limits: the KL reference model (beta > 0) stays a full frozen replica on every rank (no optimizer state, so it is a
small share of the memory); the unsharded model must fit on one device during generation, as any colocated sampler
needs. Checkpoints are sharded (torch.distributed.checkpoint, one file per rank; dash/rl/checkpoint.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

import dash_kernels  # noqa: F401 (first: its torch floor check names the fix where the next import would fail)

# isort: split
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method  # public from torch 2.6

from dash.rl.distributed import DistInfo, all_reduce_max
from dash.rl.packing import collate
from dash.rl.rollout import Rollout

_PAD_TOKEN = 0  # any id in the vocabulary: the padding micro-batch is one token whose loss is multiplied by 0


def shard_model(model, average_grads: bool):
    """Applies FSDP2 in place: each decoder layer is one shard group, the root holds the rest. `forward_packed` (the
    training entry point) is registered so FSDP gathers the root's parameters for it as it does for `forward`."""
    for layer in model.model.layers:
        fully_shard(layer)  # reshard after forward: in training only the running layer (and a prefetched one) is full
    fully_shard(model)  # the root keeps its parameters after forward: lm_head_weight is read by the loss after it
    register_fsdp_forward_method(model, "forward_packed")
    # FSDP averages gradients over ranks by default; the global normaliser already divides by the global count.
    # A custom factor makes FSDP reduce with ReduceOp.PREMUL_SUM, which gloo rejects ("Cannot use ReduceOp.PREMUL_SUM
    # with Gloo", torch 2.13): there, reduce with a plain SUM and scale separately.
    plain_sum = dist.get_backend() == "gloo"
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(float(dist.get_world_size()) if average_grads else 1.0)
        m.set_force_sum_reduction_for_comms(plain_sum)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def fsdp_modules(model) -> list:
    """Every FSDP-managed module, layers first and the root last."""
    return [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model] + [model]


@contextmanager
def gathered(model):
    """Full parameters on every rank for the body (generation, evaluation); a no-op for an unsharded model.

    Every rank must enter it (the all-gather is collective). On exit the full copies are freed and the sharded
    parameters are registered again.
    """
    if not is_sharded(model):
        yield model
        return
    modules = fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # shard_model's settings: layers yes, root no


def reshard_all(model) -> None:
    """Frees any full copy left by a forward (the root keeps its parameters after forward) before the optimizer steps
    on the shards, so the next forward gathers the updated values."""
    for m in fsdp_modules(model):
        m.reshard()


def pad_micro_batch(device: torch.device):
    """A one-token micro-batch for zero-weight padding (see the module docstring)."""
    one = Rollout([[_PAD_TOKEN]], [[_PAD_TOKEN]], [torch.zeros(1)], torch.zeros(1), 1)
    return collate(one, [0], torch.zeros(1), device)


def pad_plans(plans: list[list[tuple]], info: DistInfo, device: torch.device) -> tuple[list[list[tuple]], int]:
    """Pads each mini-batch's [(micro-batch, normaliser), ...] to the largest length over ranks with (pad, None)
    entries; returns the padded plans and the number of pads added on this rank."""
    if not info.enabled:
        return plans, 0
    most = all_reduce_max([float(len(p)) for p in plans], info)
    pad = pad_micro_batch(device)
    padded = [plan + [(pad, None)] * (int(m) - len(plan)) for plan, m in zip(plans, most)]
    return padded, sum(int(m) - len(p) for p, m in zip(plans, most))


def zero_weight_backward(model, mb) -> None:
    """Forward and backward through every parameter with a zero loss: joins FSDP's per-layer all-gathers and
    reduce-scatters without changing the gradient. lm_head_weight is added because the packed forward does not use an
    untied lm_head, and every rank must reduce-scatter the same parameters."""
    hidden = model.forward_packed(mb.input_ids, mb.cu_seqlens, mb.positions)  # [T, H]
    ((hidden.sum() + model.lm_head_weight.sum()) * 0.0).backward()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the grad norm of sharded gradients) as a plain tensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
