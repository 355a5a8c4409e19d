"""Causal attention over packed variable-length sequences (the training path of `dash.model`).

Sequences are packed end to end into one [T, ...] tensor and delimited by `cu_seqlens` ([B+1] int32, cumulative
lengths starting at 0), the flash-attn varlen convention. Every token attends to itself and to the earlier tokens of
its own sequence only.

Backends, chosen once at import:
- flash-attn `flash_attn_varlen_func` when `flash_attn` imports and the tensors are fp16 / bf16 on CUDA (no padding
  at all); fp32 (which flash-attn rejects) takes SDPA.
- torch SDPA otherwise. Two layouts:
  * all sequences the same length (fixed-shape tasks, SFT rows of one length, the sampler's equal-length prompts):
    a free reshape to [B, L] and one `is_causal=True` call, no copies;
  * ragged: scatter into a right-padded [B, Lmax] batch, the same `is_causal=True` call, gather the real rows back.
    With right padding, query i of a sequence of length n (i < n) only sees keys j <= i < n, which are all real, so
    the causal mask alone is exact and no key-padding mask is needed. Pad query rows see real + pad keys (finite,
    never NaN) and are dropped by the gather, so they get zero gradient.
Both SDPA layouts are differentiable through plain torch ops. GQA is handled by SDPA's `enable_gqa` (no K/V copies).

Departures from the paper: none (the paper's code runs HF attention on padded micro-batches; packing removes the
padding FLOPs but computes the same function).

Run the tests: `.venv/bin/python -m pytest tests/model -q -k "varlen or flash"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Optional: needs a CUDA toolchain to build, so never a hard dependency.
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen = None

HAS_FLASH_ATTN: bool = _flash_varlen is not None
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn 2 kernels exist only for these
FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True, slots=True)
class SharedPrompts:
    """Packed rows in which the samples of one prompt share the prompt's rows (each prompt appears once).

    Everything but attention is per token, so the shared rows cost one prompt's worth of projections and MLP however
    many completions follow it. Attention alone needs each sample's full sequence: it runs on the "attention layout"
    (every sample's prompt + completion end to end, delimited by the forward's cu_seqlens), built by a row gather.

    Attributes:
        expand: [T_att] long, the packed row of each attention-layout token (a prompt row repeats once per sample).
        select: [T] long, the attention-layout row whose output each packed row takes (a prompt row: its first copy;
            the other copies' outputs are dropped, their keys / values still feed the completions).
    Gradients are exact: the gather's backward sums the keys' / values' contributions of every copy.
    """

    expand: torch.Tensor
    select: torch.Tensor


def _on_cuda(t: torch.Tensor) -> bool:
    """Whether `t` lives on a CUDA device (a function so tests can pretend CPU tensors are CUDA)."""
    return t.is_cuda


def flash_attn_supports(q: torch.Tensor) -> bool:
    """Whether flash-attn 2 takes `q` at all: fp16 / bf16 only (it raises on fp32) and head_dim <= 256."""
    return q.dtype in FLASH_DTYPES and q.shape[-1] <= FLASH_MAX_HEAD_DIM


def select_backend(q: torch.Tensor) -> str:
    """The backend `varlen_attention` uses for `q`: "flash" (flash-attn varlen: CUDA, fp16 / bf16, head_dim <= 256)
    or "sdpa"."""
    if _flash_varlen is not None and _on_cuda(q) and flash_attn_supports(q):
        return "flash"
    return "sdpa"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Causal self-attention within each packed sequence.

    Args:
        q: (T, Hq, D) queries of all sequences, packed end to end.
        k: (T, Hkv, D) keys; Hq must be a multiple of Hkv (GQA / MQA).
        v: (T, Hkv, D) values.
        cu_seqlens: (B+1,) int32 (any integer dtype is accepted) cumulative lengths, cu_seqlens[0] == 0,
            cu_seqlens[-1] == T. Zero-length sequences are allowed.
        max_seqlen: the largest sequence length (a host int, as flash-attn needs it without a device sync).
            The SDPA path reads the lengths on the host: keep cu_seqlens on CPU there to avoid a sync per layer.
        scale: softmax scale, usually head_dim ** -0.5.

    Returns:
        (T, Hq, D) attention output in q's dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention expects [T, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if select_backend(q) == "flash":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # flash-attn requires int32 offsets
        return _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    return _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale)


def _sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """SDPA fallback: equal lengths -> reshape; ragged -> right-padded scatter / gather (see module docstring)."""
    T, Hq, D = q.shape
    if T == 0:
        return q.new_empty(0, Hq, D)
    # The length pattern is needed on the host to pick the layout; cu_seqlens is tiny (B+1 ints).
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device="cpu", dtype=torch.long)  # [B]
    B = lengths.numel()
    L_first = int(lengths[0])
    if L_first > 0 and bool((lengths == L_first).all()):
        split = (B, L_first, -1, D)
        out = _sdpa_batched(q.reshape(split), k.reshape(split), v.reshape(split), scale)  # [B, L, Hq, D]
        return out.reshape(T, Hq, D)

    lmax = int(lengths.max())  # max_seqlen is only a hint here: the exact value is already on the host
    # Flat slot of token t in the padded [B * Lmax] layout: seq_id * Lmax + offset within its sequence.
    seq_id = torch.repeat_interleave(torch.arange(B), lengths)  # [T]
    starts = torch.cumsum(lengths, 0) - lengths  # [B] first token of each sequence
    offset = torch.arange(T) - starts[seq_id]  # [T]
    slot = (seq_id * lmax + offset).to(q.device)  # [T]

    def scatter(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, Lmax, H, D], zeros in the padding
        padded = x.new_zeros(B * lmax, x.shape[1], D)
        return padded.index_copy(0, slot, x).view(B, lmax, x.shape[1], D)

    out = _sdpa_batched(scatter(q), scatter(k), scatter(v), scale)  # [B, Lmax, Hq, D]
    return out.reshape(B * lmax, Hq, D).index_select(0, slot)  # [T, Hq, D]


def _sdpa_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA on [B, L, H, D] tensors; returns [B, L, Hq, D]."""
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [B, Hq, L, D]
        k.transpose(1, 2),  # [B, Hkv, L, D]
        v.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)  # [B, L, Hq, D]
