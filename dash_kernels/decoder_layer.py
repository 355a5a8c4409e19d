"""One decoder layer of the sampler's forward on a paged KV cache: `decoder_layer_(x, weights, ...)`, x in place.

The layer is the pre-norm GQA block of Llama / Qwen2 / Qwen3 (optional q/k/v and o biases, optional Qwen3 q/k
RMSNorm over head_dim, SwiGLU MLP):

    h = rms_norm(x); q, k, v = proj(h); [q, k = q_norm(q), k_norm(k)]; rope(q, k); o = attend(q, k, v)
    x += o_proj(o); h = rms_norm(x); x += down(silu(gate(h)) * up(h))

Layers (no autograd: inference only):
- `decoder_layer_ref`: the chain in torch ops and this package's public inference ops (C++ on fp32 CPU, Triton on
  CUDA), with the attention given as a callable, so the engine also runs its varlen and flash-attn steps through it;
- the C++ op `torch.ops.dash.decoder_layer_` (csrc/decoder_layer_cpu.cpp; its fake kernel is registered at the end
  of this module): the same chain in one call without the GIL, for fp32
  CPU steps whose attention reads the pages (decode, or prefill with per-sequence query runs). It exists for the
  Python glue between ~15 small ops, which costs more than the ops at a tiny model's decode step;
- `decoder_layer_`: the public function, the C++ op where it applies, else the reference with paged attention.
Both paths call the same kernels in the same order on fp32 CPU, so their results are bitwise equal there.
`pack_layer(weights)` packs a layer's projections for `dash_kernels.linear`'s AVX-512 GEMMs (None where they do not
run); given as `packed`, the C++ op runs its GEMMs on them, with the residual adds and SwiGLU in the GEMMs'
epilogues: the same math, equal to the reference chain up to the GEMMs' summation order.

`weights` lists the layer's tensors in LAYER_WEIGHTS order, None for an absent bias or q/k norm; all RMSNorms share
`eps`. `lora` (optional, same order) gives LoRA adapters as (A [r, in], B [out, r], scaling) for projection slots:
the reference chain adds scaling * (h A^T) B^T beside each h W^T (no merged weight); the C++ op has no such term, so
with adapters it runs only on `packed` weights that already hold W + scaling * B A (the caller folds them in).
Tests: tests/kernels/test_decoder_layer.py; the engine's HF parity tests run every fp32 CPU decode through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dash_kernels import kv
from dash_kernels._ext import HAS_C, as_int32, use_cpu_kernel
from dash_kernels.linear import pack_gate_up, pack_linear, packed_gemm_available
from dash_kernels.paged_attention import paged_attention
from dash_kernels.rms_norm import add_rms_norm_, rms_norm
from dash_kernels.rotary import rotary_
from dash_kernels.silu_mul import silu_mul_

__all__ = ["LAYER_WEIGHTS", "PACKED_WEIGHTS", "decoder_layer_", "decoder_layer_ref", "pack_layer"]

# Slot order of `weights` (csrc/decoder_layer_cpu.cpp's LayerWeight enum): [out, in] matrices, [n] biases / norms.
LAYER_WEIGHTS = ("input_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "q_norm", "k_norm", "o", "o_bias",
                 "post_norm", "gate", "up", "down")
# Order of pack_layer's list (csrc/decoder_layer_cpu.cpp's PackedWeight enum).
PACKED_WEIGHTS = ("q", "k", "v", "o", "gate_up", "down")
_OPTIONAL = {"q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o_bias"}

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> o [T, Hq, D]
Adapter = tuple[torch.Tensor, torch.Tensor, float]  # LoRA (A [r, in], B [out, r], scaling)


def _linear(h: torch.Tensor, w: dict, name: str, bias: torch.Tensor | None, lora: dict) -> torch.Tensor:
    """h W^T + b (+ scaling * (h A^T) B^T when slot `name` has an adapter, in peft's order of operations)."""
    out = F.linear(h, w[name], bias)
    adapter = lora.get(name)
    if adapter is None:
        return out
    A, B, scaling = adapter
    return out + F.linear(F.linear(h, A), B) * scaling


def decoder_layer_ref(x: torch.Tensor, weights: Sequence[torch.Tensor | None], eps: float, cos: torch.Tensor,
                      sin: torch.Tensor, attend: Attend, lora: Sequence[Adapter | None] | None = None) -> None:
    """x [T, H] <- the layer's output, in place. cos / sin: [T, D] RoPE tables of the tokens' positions.

    attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) stores the new K/V where the step keeps them and returns the
    attention output [T, Hq, D].
    """
    w = dict(zip(LAYER_WEIGHTS, weights, strict=True))
    ad = {} if lora is None else {n: a for n, a in zip(LAYER_WEIGHTS, lora, strict=True) if a is not None}
    T, D = x.shape[0], cos.shape[-1]
    h = rms_norm(x, w["input_norm"], eps)  # [T, H]
    q = _linear(h, w, "q", w["q_bias"], ad).view(T, -1, D)  # [T, Hq, D]
    k = _linear(h, w, "k", w["k_bias"], ad).view(T, -1, D)  # [T, Hkv, D]
    v = _linear(h, w, "v", w["v_bias"], ad).view(T, -1, D)  # [T, Hkv, D]
    if w["q_norm"] is not None:  # Qwen3
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    rotary_(q, k, cos, sin)
    o = attend(q, k, v)
    h = add_rms_norm_(x, _linear(o.reshape(T, -1), w, "o", w["o_bias"], ad), w["post_norm"], eps)  # x += attn
    gate = _linear(h, w, "gate", None, ad)  # [T, I]
    x.add_(_linear(silu_mul_(gate, _linear(h, w, "up", None, ad)), w, "down", None, ad))  # x += mlp


def pack_layer(weights: Sequence[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """The layer's projection weights (LAYER_WEIGHTS order) packed for the C++ layer's AVX-512 GEMMs, in
    PACKED_WEIGHTS order; None where those GEMMs do not run (not fp32 CPU, no AVX-512, reference backend)."""
    w = dict(zip(LAYER_WEIGHTS, weights, strict=True))
    if not packed_gemm_available(*(t for t in weights if t is not None)):
        return None
    return [(pack_gate_up(w["gate"], w["up"]) if name == "gate_up" else pack_linear(w[name])).data
            for name in PACKED_WEIGHTS]


def decoder_layer_(x: torch.Tensor, weights: Sequence[torch.Tensor | None], eps: float, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   page_table: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
                   scale: float | None = None, max_q_len: int | None = None, check_slots: bool = True,
                   packed: Sequence[torch.Tensor] | None = None,
                   lora: Sequence[Adapter | None] | None = None) -> torch.Tensor:
    """The layer over x [T, H] in place (returned), attention read from the paged cache after storing the new K/V.

    Args:
        weights: LAYER_WEIGHTS order, None for an absent optional slot.
        k_cache, v_cache: [num_pages, page_size, Hkv, D]; slot_mapping: [T] int32 slot of each token's K/V.
        page_table, context_lens, cu_seqlens_q, scale, max_q_len: as `dash_kernels.paged_attention` (cu_seqlens_q
            None: decode, one token per sequence).
        check_slots: False skips the slot range check on CUDA (two host syncs) for a caller whose slots come from
            the page allocator; CPU always checks.
        packed: `pack_layer(weights)` (None: torch's GEMMs). Used by the C++ op; the reference chain, taken where
            the op does not apply, reads `weights`.
        lora: LAYER_WEIGHTS order, (A, B, scaling) or None per slot: adapters applied beside `weights` by the
            reference chain. With `packed`, that must already hold the merged W + scaling * B A (the C++ op
            reads it; the reference chain, where the op does not apply, reads `weights` and `lora`).
    """
    if len(weights) != len(LAYER_WEIGHTS):
        raise ValueError(f"decoder_layer_: weights must have {len(LAYER_WEIGHTS)} slots {LAYER_WEIGHTS}, "
                         f"got {len(weights)}")
    missing = [n for n, t in zip(LAYER_WEIGHTS, weights) if t is None and n not in _OPTIONAL]
    if missing:
        raise ValueError(f"decoder_layer_: weights {missing} are required, got None")
    scale = cos.shape[-1] ** -0.5 if scale is None else scale
    # With `packed`, pack_layer has already checked the weights (fp32 CPU): a decode step then checks 2 tensors, not 17.
    # The C++ op has no adapter term: with adapters it runs only on `packed`, which holds them merged.
    plain = lora is None or all(a is None for a in lora)
    if (use_cpu_kernel(x, k_cache) and x.is_contiguous()
            and (packed is not None or (plain and use_cpu_kernel(*(t for t in weights if t is not None))))):
        meta = [as_int32(t) for t in (slot_mapping, page_table, context_lens, cu_seqlens_q)]
        torch.ops.dash.decoder_layer_(x, list(weights), eps, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
                                      *meta, scale, list(packed) if packed is not None else [])
        return x

    def attend(q, k, v):
        kv.store_kv(k, v, k_cache, v_cache, slot_mapping, check_slots=check_slots)
        return paged_attention(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale=scale,
                               max_q_len=max_q_len)

    decoder_layer_ref(x, weights, eps, cos, sin, attend, lora)
    return x


if HAS_C:
    @torch.library.register_fake("dash::decoder_layer_")
    def _decoder_layer_fake(x, weights, eps, cos, sin, k_cache, v_cache, slot_mapping, page_table, context_lens,
                            cu_seqlens_q, scale, packed=()):
        return None  # x and the caches are written in place
