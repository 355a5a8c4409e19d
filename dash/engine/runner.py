"""Runs one scheduled step of the live model against the paged KV cache: the only engine file that touches the
model's parameters and device memory.

The model is `dash.model.CausalLM`, used as-is: its embedding, `Attention.project` (projections, q/k norm), `o_proj`,
MLP projections and lm_head are called piece by piece here with the layers' own parameters. What is replaced is the
glue between them, by inference kernels from dash_kernels (C++ for fp32 CPU, Triton on CUDA, the same torch code as
the model elsewhere): RMSNorm fused with the residual add (`add_rms_norm_`, the residual stream x is updated in
place), RoPE in place on q and k (`rotary_`), SiLU * up in place (`silu_mul_`), and the attention. The parameters
are read at every step, so a `generate` call after an optimizer step sees the new weights with no copy, reload or
sync (the trainer and the sampler share one `nn.Module`).

Attention per step:
- prefill: `store_kv` writes the new K/V to their pages. With no prefix-cache hit in the step, the K/V are exactly the
  projections just computed: causal varlen attention over them (`dash.attention.varlen_attention`). With a hit
  (`ctx.page_table` set), the prefix lives only in the pages: `dash_kernels.paged_attention` with per-sequence query
  runs reads it. On fp32 CPU a prefill without a hit also takes the paged path when its runs are short or ragged
  (`paged_prefill`, see `Scheduler`): the C++ kernel reads the pages in place, where SDPA pads the runs to the
  longest one. Pages another entry of the same step shares are written by that entry in the same layer before any
  attention of the layer runs, so in-step sharing needs no ordering between entries.
- decode: `store_kv` writes the new token first, then the pages are read by flash-attn's `flash_attn_with_kvcache`
  (CUDA, flash-attn installed, fp16 / bf16, page_size a multiple of 256; untested here, no GPU), else
  `dash_kernels.paged_attention` (its Triton kernel on CUDA, the C++ kernel for fp32 CPU, gather + SDPA otherwise).
Logits are computed for the sampled rows only (last prefill token / every decode token), in fp32.
"""

from __future__ import annotations

import torch

from dash.attention import flash_attn_supports, varlen_attention
from dash.engine.kv_cache import Context, KVCache
from dash_kernels import kv
from dash_kernels._ext import use_cpu_kernel
from dash_kernels.paged_attention import paged_attention
from dash_kernels.rms_norm import add_rms_norm_, rms_norm
from dash_kernels.rotary import rotary_
from dash_kernels.silu_mul import silu_mul_

try:  # optional, CUDA only; its paged KV needs page_size % 256 == 0 (FA2's block-table constraint)
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_with_kvcache = None

_FLASH_PAGE_MULTIPLE = 256


class ModelRunner:
    def __init__(self, model, cache: KVCache, max_len: int) -> None:
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.use_flash = (flash_attn_with_kvcache is not None and self.device.type == "cuda"
                          and cache.page_size % _FLASH_PAGE_MULTIPLE == 0 and flash_attn_supports(cache.k[0]))
        # Prefill attention from the pages even without a prefix hit where that kernel can be the fast one (the C++
        # loop on fp32 CPU; the scheduler picks per step); on CUDA varlen flash attention stays the no-hit path.
        self.paged_prefill = use_cpu_kernel(cache.k[0])
        # RoPE tables for every position of this call, looked up per step: computing cos/sin of [T, D] angles costs
        # ~6 small ops per step, a row gather costs 2. Same values as the model's own tables (same function).
        with torch.no_grad():
            self.cos, self.sin = model.model.rotary_emb(torch.arange(max_len, device=self.device))  # [max_len, D]

    @torch.inference_mode()
    def run(self, ctx: Context) -> torch.Tensor:
        """Forward one step; returns fp32 logits [R, V] for the rows the scheduler samples from."""
        ctx = ctx.to(self.device)
        if not ctx.is_prefill:
            self.cache.copy_on_write(ctx.cow_src, ctx.cow_dst)
        inner = self.model.model
        layers = inner.layers
        cos, sin = self.cos[ctx.positions], self.sin[ctx.positions]  # [T, D] each
        x = inner.embed_tokens(ctx.input_ids)  # [T, H]: the residual stream, a fresh tensor updated in place below
        T = x.shape[0]
        norm = layers[0].input_layernorm
        h = rms_norm(x, norm.weight, norm.eps)  # [T, H]: the current sub-block's normed input
        for i, (layer, k_cache, v_cache) in enumerate(zip(layers, self.cache.k, self.cache.v)):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attn.project(h)  # [T, Hq, D], [T, Hkv, D] x2
            rotary_(q, k, cos, sin)
            # The allocator made these slots (in range by construction): no per-layer range check, which on CUDA
            # would sync the host with the device twice per layer.
            kv.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, check_slots=False)
            if ctx.is_prefill and ctx.page_table is not None:
                o = paged_attention(q, k_cache, v_cache, ctx.page_table, ctx.context_lens, ctx.cu_seqlens,
                                    scale=attn.scale, max_q_len=ctx.max_seqlen)
            elif ctx.is_prefill:
                o = varlen_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, attn.scale)  # [T, Hq, D]
            elif self.use_flash:  # not exercised on this CPU-only box
                o = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=ctx.context_lens,
                                            block_table=ctx.page_table, softmax_scale=attn.scale, causal=True)[:, 0]
            else:
                o = paged_attention(q, k_cache, v_cache, ctx.page_table, ctx.context_lens, scale=attn.scale)
            norm = layer.post_attention_layernorm
            h = add_rms_norm_(x, attn.o_proj(o.reshape(T, -1)), norm.weight, norm.eps)  # x += attn
            gate = mlp.gate_proj(h)  # [T, I]
            mlp_out = mlp.down_proj(silu_mul_(gate, mlp.up_proj(h)))  # [T, H]
            if i + 1 < len(layers):
                norm = layers[i + 1].input_layernorm
                h = add_rms_norm_(x, mlp_out, norm.weight, norm.eps)  # x += mlp
            else:
                x.add_(mlp_out)
        if ctx.logits_index is not None:
            x = x[ctx.logits_index]  # [E, H]: only the last token of each prefill is sampled
        return self.model.compute_logits_fp32(rms_norm(x, inner.norm.weight, inner.norm.eps))  # [R, V]
