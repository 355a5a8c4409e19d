"""Runs one scheduled step of the live model against the paged KV cache: the only engine file that touches the
model's parameters and device memory.

The model is `dash.model.CausalLM`, used as-is: its embedding, each decoder layer's parameters (listed once per call
in `dash_kernels.decoder_layer.LAYER_WEIGHTS` order, the tensors themselves, not copies) and its final norm and
lm_head. The layer chain is `dash_kernels.decoder_layer`: RMSNorm (C++ for fp32 CPU, Triton on CUDA), the model's
projections as GEMMs, q/k norm, RoPE in place, the attention below, the residual adds and SwiGLU. The parameters are
read at every step, so a `generate` call after an optimizer step sees the new weights with no copy, reload or sync
(the trainer and the sampler share one `nn.Module`). LoRA adapters (dash/lora.py) are applied without a merged model:
the layer chain adds scaling * (h A^T) B^T beside each adapted h W^T; on fp32 CPU with packed GEMMs, the copy packed
once per call holds W + scaling * B A instead (built one layer at a time).

Attention per step:
- paged (`decoder_layer_`): a decode step, and a prefill with page tables (a prefix-cache hit, or on fp32 CPU short /
  ragged runs, see `Scheduler.prefill_prefers_pages`). The new K/V are stored first, then read in place with the other
  tokens' by `dash_kernels.paged_attention` (its Triton kernel on CUDA; on fp32 CPU the whole layer is one C++ call).
  Pages another entry of the same step shares are written by that entry in the same layer before any attention of
  the layer runs, so in-step sharing needs no ordering between entries.
- fresh (`decoder_layer_ref` with `_attend_fresh`): a prefill without page tables runs causal varlen attention over
  the K/V it just computed (`dash.attention.varlen_attention`); a decode step with flash-attn installed on CUDA
  (fp16 / bf16, page_size a multiple of 256) reads the pages with `flash_attn_with_kvcache` (untested here, no GPU).
Logits are computed for the sampled rows only (last prefill token / every decode token), in fp32.
"""

from __future__ import annotations

from functools import partial

import torch

from dash.attention import flash_attn_supports, varlen_attention
from dash.engine.kv_cache import Context, KVCache
from dash.lora import layer_adapters, merged_weight
from dash_kernels import kv
from dash_kernels._ext import use_cpu_kernel
from dash_kernels.decoder_layer import decoder_layer_, decoder_layer_ref, pack_layer
from dash_kernels.linear import linear_packed, pack_linear, packed_gemm_available
from dash_kernels.paged_attention import cpu_prefill_prefers_pages
from dash_kernels.rms_norm import rms_norm

try:  # optional, CUDA only; its paged KV needs page_size % 256 == 0 (FA2's block-table constraint)
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_with_kvcache = None

_FLASH_PAGE_MULTIPLE = 256
# Largest layer weights (fp32 bytes, all layers) the runner packs for a call: the packed copy doubles their memory
# while the call runs. 4 GiB covers fp32 models up to ~1B parameters, far past what samples usefully on a CPU.
PACKED_WEIGHTS_BUDGET_BYTES = 4 << 30


class ModelRunner:
    def __init__(self, model, cache: KVCache, max_len: int) -> None:
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
        self.weights = [layer_weights(layer) for layer in layers]  # read once per call: the weights cannot change
        # LoRA adapters (dash/lora.py), per layer: applied beside the base weights, never merged into the model.
        self.adapters = [layer_adapters(layer) for layer in layers]
        # fp32 CPU with AVX-512: the projections and the lm_head packed for dash_kernels.linear's GEMMs (2-3x MKL's
        # AVX2 code on AMD), a derived copy that lives for this call only; above the budget, or elsewhere, torch's
        # GEMMs read the weights.
        with torch.no_grad():
            head = model.lm_head_weight  # [V, H]
            packable = (self.paged_prefill and packed_gemm_available(head)
                        and _weight_bytes([*self.weights, [head]]) <= PACKED_WEIGHTS_BUDGET_BYTES)
            # With adapters the packed copy holds W + scaling * B A (one layer's merged weights exist at a time).
            self.packed = [pack_layer(_merged(w, a)) if packable else None for w, a in zip(self.weights, self.adapters)]
            self.packed_head = pack_linear(head) if packable else None
        self.eps, self.scale = model.config.rms_norm_eps, layers[0].self_attn.scale

    @torch.inference_mode()
    def run(self, ctx: Context) -> torch.Tensor:
        """Forward one step; returns fp32 logits [R, V] for the rows the scheduler samples from."""
        ctx = ctx.to(self.device)
        if not ctx.is_prefill:
            self.cache.copy_on_write(ctx.cow_src, ctx.cow_dst)
        inner = self.model.model
        cos, sin = self.cos.index_select(0, ctx.positions), self.sin.index_select(0, ctx.positions)  # [T, D] each
        x = inner.embed_tokens(ctx.input_ids)  # [T, H]: the residual stream, a fresh tensor updated in place below
        paged = ctx.page_table is not None and (ctx.is_prefill or not self.use_flash)
        for w, packed, lora, k_cache, v_cache in zip(self.weights, self.packed, self.adapters, self.cache.k,
                                                     self.cache.v):
            if paged:
                # The allocator made the slots (in range by construction): no per-layer range check, which on CUDA
                # would sync the host with the device twice per layer.
                decoder_layer_(x, w, self.eps, cos, sin, k_cache, v_cache, ctx.slot_mapping, ctx.page_table,
                               ctx.context_lens, ctx.cu_seqlens if ctx.is_prefill else None, self.scale,
                               max_q_len=ctx.max_seqlen if ctx.is_prefill else 1, check_slots=False, packed=packed,
                               lora=lora)
            else:
                decoder_layer_ref(x, w, self.eps, cos, sin, partial(self._attend_fresh, ctx, k_cache, v_cache), lora)
        if ctx.logits_index is not None:
            x = x[ctx.logits_index]  # [E, H]: only the last token of each prefill is sampled
        h = rms_norm(x, inner.norm.weight, inner.norm.eps)  # [R, H]
        if self.packed_head is not None:
            return linear_packed(h, self.packed_head)  # [R, V] fp32
        return self.model.compute_logits_fp32(h)  # [R, V]

    def _attend_fresh(self, ctx: Context, k_cache, v_cache, q, k, v) -> torch.Tensor:
        """Attention of a step without page tables, or of a flash-attn decode: [T, Hq, D]."""
        kv.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, check_slots=False)
        if ctx.is_prefill:
            return varlen_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, self.scale)
        return flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=ctx.context_lens,  # not run here
                                       block_table=ctx.page_table, softmax_scale=self.scale, causal=True)[:, 0]


def _merged(weights: list[torch.Tensor | None], adapters: list | None) -> list[torch.Tensor | None]:
    """A layer's weights with each adapted projection replaced by W + scaling * B A (new tensors, for packing)."""
    return weights if adapters is None else [merged_weight(w, a) for w, a in zip(weights, adapters)]


def _weight_bytes(weights: list[list[torch.Tensor | None]]) -> int:
    return sum(t.numel() * t.element_size() for layer in weights for t in layer if t is not None)


def layer_weights(layer) -> list[torch.Tensor | None]:
    """A `dash.model.DecoderLayer`'s parameters in LAYER_WEIGHTS order (the tensors themselves, None if absent)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_norm = None if attn.q_norm is None else attn.q_norm.weight
    k_norm = None if attn.k_norm is None else attn.k_norm.weight
    return [layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
            attn.v_proj.weight, attn.v_proj.bias, q_norm, k_norm, attn.o_proj.weight, attn.o_proj.bias,
            layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
