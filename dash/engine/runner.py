"""Runs one scheduled step of the live model against the paged KV cache: the only engine file that touches the
model's parameters and device memory.

The model is `dash.model.CausalLM`, used as-is, through its own `paged_forward(input_ids, ctx)` (as nano-vllm's
model reads a per-step context): `ctx` is a `StepContext` (below) carrying the scheduler's slots, page tables,
context lengths and cu_seqlens, the RoPE tables of the step's positions, and each layer's `LayerState` for the call.
A layer's state is built once per call by the layer itself (`DecoderLayer.paged_state`) from its own Parameters, the
tensors themselves, not copies: a `generate` call after an optimizer step sees the new weights with no copy, reload
or sync (the trainer and the sampler share one `nn.Module`). LoRA adapters (dash/lora.py) are applied without a
merged model: the layer chain adds scaling * (h A^T) B^T beside each adapted h W^T; on fp32 CPU with packed GEMMs,
the copy the layer packs once per call holds W + scaling * B A instead (built one layer at a time).

Attention per step (`StepContext.paged`):
- paged (`decoder_layer_`): a decode step, and a prefill with page tables (a prefix-cache hit, or on fp32 CPU short /
  ragged runs, see `Scheduler.prefill_prefers_pages`). The new K/V are stored first, then read in place with the other
  tokens' by `dash_kernels.paged_attention` (its Triton kernel on CUDA; on fp32 CPU the whole layer is one C++ call).
  Pages another entry of the same step shares are written by that entry in the same layer before any attention of
  the layer runs, so in-step sharing needs no ordering between entries.
- fresh (`decoder_layer_ref` with `StepContext.fresh_attention`): a prefill without page tables runs causal varlen
  attention over the K/V it just computed (`dash.attention.varlen_attention`); a decode step with flash-attn installed
  on CUDA (fp16 / bf16, page_size a multiple of 256) reads the pages with `flash_attn_with_kvcache` (untested here).
Logits are computed for the sampled rows only (last prefill token / every decode token), in fp32.
CUDA graphs (dash/engine/cuda_graphs.py): on CUDA a decode step of up to MAX_GRAPH_BATCH rows replays the graph of
its batch-size bucket (`forward` on static, padded buffers), captured in `prepare` before the bucket's first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dash.attention import flash_attn_supports, varlen_attention
from dash.engine.cuda_graphs import DecodeGraphs, use_decode_graphs
from dash.engine.kv_cache import Context, KVCache
from dash.lora import layer_adapters
from dash.model_parts import LayerState
from dash_kernels import kv
from dash_kernels._ext import use_cpu_kernel
from dash_kernels.linear import linear_packed, pack_linear, packed_gemm_available
from dash_kernels.paged_attention import cpu_prefill_prefers_pages

try:  # optional, CUDA only; its paged KV needs page_size % 256 == 0 (FA2's block-table constraint)
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_with_kvcache = None

_FLASH_PAGE_MULTIPLE = 256
# Largest layer weights (fp32 bytes, all layers) the runner packs for a call: the packed copy doubles their memory
# while the call runs. 4 GiB covers fp32 models up to ~1B parameters, far past what samples usefully on a CPU.
PACKED_WEIGHTS_BUDGET_BYTES = 4 << 30


@dataclass(slots=True)
class StepContext:
    """What `CausalLM.paged_forward` reads in one step.

    Attributes:
        layers: each decoder layer's LayerState for this call.
        paged: attention reads the pages (`decoder_layer_`); False: `fresh_attention`.
        cos, sin: [T, D] RoPE tables of the step's positions.
        slot_mapping: [T] int32; page_table: [B, W] int32 or None; context_lens: [B] int32 or None (Context's).
        cu_seqlens: [E+1] int32 query runs of a prefill, None for a decode step (one token per sequence).
        max_q_len: longest query run (1 for decode); logits_index: [E] long sampled rows of a prefill, or None.
        scale: softmax scale; step: the scheduler's Context on the model's device; use_flash: see ModelRunner.
    """

    layers: list[LayerState]
    paged: bool
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor | None
    context_lens: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_q_len: int
    logits_index: torch.Tensor | None
    scale: float
    step: Context

    def fresh_attention(self, state: LayerState):
        """(q, k, v) -> o [T, Hq, D] for a step without page tables, or a flash-attn decode, on `state`'s pages."""
        return partial(_attend_fresh, self, state)


def _attend_fresh(ctx: StepContext, state: LayerState, q, k, v) -> torch.Tensor:
    step = ctx.step
    kv.store_kv(k, v, state.k_cache, state.v_cache, step.slot_mapping, check_slots=False)
    if step.is_prefill:
        return varlen_attention(q, k, v, step.cu_seqlens, step.max_seqlen, ctx.scale)
    return flash_attn_with_kvcache(q[:, None], state.k_cache, state.v_cache, cache_seqlens=step.context_lens,
                                   block_table=step.page_table, softmax_scale=ctx.scale, causal=True)[:, 0]  # not run


class ModelRunner:
    def __init__(self, model, cache: KVCache, max_len: int, cuda_graphs: bool = False, max_batch: int = 1,
                 max_pages: int = 1) -> None:
        """cuda_graphs: replay decode steps from CUDA graphs where that applies (dash/engine/cuda_graphs.py), for
        batches up to max_batch rows and page tables up to max_pages pages wide (the call's bounds)."""
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.use_flash = (flash_attn_with_kvcache is not None and self.device.type == "cuda"
                          and cache.page_size % _FLASH_PAGE_MULTIPLE == 0 and flash_attn_supports(cache.k[0]))
        # fp32 CPU (the C++ kernels): prefill attention from the pages even without a prefix hit where that kernel
        # can be the fast one (the scheduler picks per step; a paged step is also one C++ call per layer). On CUDA
        # varlen flash attention stays the no-hit prefill path.
        self.paged_prefill = use_cpu_kernel(cache.k[0])
        # The scheduler's per-step choice (Scheduler.prefill_prefers_pages): the kernel's own cost model, given here
        # so the scheduler imports no kernel module.
        self.prefill_prefers_pages = cpu_prefill_prefers_pages if self.paged_prefill else None
        # RoPE tables for every position of this call, looked up per step: computing cos/sin of [T, D] angles costs
        # ~6 small ops per step, a row gather costs 2. Same values as the model's own tables (same function).
        with torch.no_grad():
            self.cos, self.sin = model.model.rotary_emb(torch.arange(max_len, device=self.device))  # [max_len, D]
        layers = model.model.layers
        # fp32 CPU with AVX-512: the projections and the lm_head packed for dash_kernels.linear's GEMMs (2-3x MKL's
        # AVX2 code on AMD), a derived copy that lives for this call only; above the budget, or elsewhere, torch's
        # GEMMs read the weights.
        with torch.no_grad():
            head = model.lm_head_weight  # [V, H]
            packable = (self.paged_prefill and packed_gemm_available(head)
                        and _weight_bytes([*(layer.weight_slots() for layer in layers), [head]])
                        <= PACKED_WEIGHTS_BUDGET_BYTES)
            # LoRA adapters (dash/lora.py), per layer: applied beside the base weights, never merged into the model.
            self.layers = [layer.paged_state(k, v, layer_adapters(layer), packable)
                           for layer, k, v in zip(layers, cache.k, cache.v, strict=True)]
            self.packed_head = pack_linear(head) if packable else None
        self.scale = layers[0].self_attn.scale
        # Decode steps through per-batch-size CUDA graphs (None: every step eager, e.g. on CPU).
        self.graphs = (DecodeGraphs(self, max_batch, max_pages)
                       if use_decode_graphs(self.device, cuda_graphs) else None)

    @torch.inference_mode()
    def prepare(self, ctx: Context) -> None:
        """Before `run(ctx)`: capture the CUDA graph of a decode step's batch-size bucket if it has none yet (the
        one host sync of a capture stays out of `run`, whose decode steps add none)."""
        if self.graphs is not None and not ctx.is_prefill:
            self.graphs.prepare(ctx.input_ids.shape[0])

    @torch.inference_mode()
    def run(self, ctx: Context) -> torch.Tensor:
        """Forward one step; returns fp32 logits [R, V] for the rows the scheduler samples from."""
        bucket = None if ctx.is_prefill or self.graphs is None else self.graphs.bucket(ctx)
        if bucket is not None:  # the step's inputs go straight into the bucket's static buffers
            if ctx.cow_src.numel():
                self.cache.copy_on_write(ctx.cow_src.to(self.device, non_blocking=True),
                                         ctx.cow_dst.to(self.device, non_blocking=True))
            h = self.graphs.forward(ctx, bucket)  # [B, H]
        else:
            ctx = ctx.to(self.device)
            if not ctx.is_prefill:
                self.cache.copy_on_write(ctx.cow_src, ctx.cow_dst)
            h = self.forward(ctx)  # [R, H]
        if self.packed_head is not None:
            return linear_packed(h, self.packed_head)  # [R, V] fp32
        return self.model.compute_logits_fp32(h)  # [R, V]

    def forward(self, ctx: Context) -> torch.Tensor:
        """The model's step on `ctx` (tensors on the model's device) -> final-normed hidden states [R, H]; what a
        decode graph captures (on its static buffers)."""
        prefill = ctx.is_prefill
        step = StepContext(
            layers=self.layers, paged=ctx.page_table is not None and (prefill or not self.use_flash),
            cos=self.cos.index_select(0, ctx.positions), sin=self.sin.index_select(0, ctx.positions),  # [T, D]
            slot_mapping=ctx.slot_mapping, page_table=ctx.page_table, context_lens=ctx.context_lens,
            cu_seqlens=ctx.cu_seqlens if prefill else None, max_q_len=ctx.max_seqlen if prefill else 1,
            logits_index=ctx.logits_index, scale=self.scale, step=ctx)
        return self.model.paged_forward(ctx.input_ids, step)  # [R, H]


def _weight_bytes(weights) -> int:
    return sum(t.numel() * t.element_size() for layer in weights for t in layer if t is not None)
