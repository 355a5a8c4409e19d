"""Paged attention: queries of B sequences attend to their keys/values stored in a paged KV cache.

One call serves decode (one query per sequence) and prefill with a cached prefix (several queries per sequence whose
K/V were stored before the call). Query i of sequence b sits at position `context_lens[b] - q_len_b + i` and sees the
keys at positions <= its own (causal). Any page size works: each key token finds its page through the page table.

Layers (one op per file): `_paged_attention_kernel` (Triton), `paged_attention_fwd` (launcher), `paged_attention_ref`
(pure torch: gather the pages into a dense [B, S] layout, then SDPA with a mask; also the CPU path), and the public
`paged_attention`. Inference only: there is no backward (the sampler runs under `torch.inference_mode`).

Backends: Triton on CUDA tensors (or anywhere under TRITON_INTERPRET=1 when `backend.override == "triton"`); on CPU,
fp32 decode and query runs go to `_C.paged_attention` (csrc/paged_attention_cpu.cpp: reads the pages in place),
everything else (other dtypes, `backend.override == "reference"`) to the gather + SDPA reference.
Tests: `.venv/bin/python -m pytest tests/kernels/test_paged_attention.py -q`.
AOT-compile signature for sm_80/sm_90 (see `AOT_SIGNATURE` below).
"""

import torch
import torch.nn.functional as F

from dash_kernels import backend
from dash_kernels._ext import _C, as_int32, on_tensor_device, use_cpu_kernel
from dash_kernels.ops._triton_utils import dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

__all__ = ["cpu_prefill_prefers_pages", "paged_attention", "paged_attention_fwd", "paged_attention_ref"]

_BLOCK_M = 16  # queries per program: prefill chunks; decode uses one row of it (masked)
_BLOCK_N = 32  # key tokens per inner iteration, independent of the page size
NUM_WARPS = 4
NUM_STAGES = 2  # key-loop pipelining depth; Triton's default 3 spills 8 bytes on sm_90 for fp32 head_dim 128 (aot)

if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q, K_cache, V_cache, Out, Page_table, Context_lens, Cu_seqlens_q, scale,
        stride_qt, stride_qh, stride_kslot, stride_kh, stride_ot, stride_oh, stride_pt,
        GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        m_block = tl.program_id(2)
        q_start = tl.load(Cu_seqlens_q + b)
        q_len = tl.load(Cu_seqlens_q + b + 1) - q_start
        if m_block * BLOCK_M >= q_len:
            return
        ctx = tl.load(Context_lens + b)
        kvh = h // GROUP  # GQA: GROUP query heads read one K/V head
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_len
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q_pos = ctx - q_len + offs_m  # absolute position of each query (causal bound)
        # Online softmax (flash-attention): running max m_i, running sum l_i, unnormalised output acc.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)  # later keys are masked for every row
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_end
            page = tl.load(Page_table + b * stride_pt + offs_n // PAGE_SIZE, mask=n_ok, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
            kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K_cache + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(V_cache + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row must not give NaN
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def AOT_SIGNATURE(dtype: str = "fp16", page_size: int = 16, head_dim: int = 128, group: int = 1) -> tuple[dict, dict]:
    """(signature, constexprs) for `triton.compile(ASTSource(fn=_paged_attention_kernel, ...))` on sm_80 / sm_90."""
    sig = {"Q": f"*{dtype}", "K_cache": f"*{dtype}", "V_cache": f"*{dtype}", "Out": f"*{dtype}",
           "Page_table": "*i32", "Context_lens": "*i32", "Cu_seqlens_q": "*i32", "scale": "fp32",
           **{name: "i32" for name in ("stride_qt", "stride_qh", "stride_kslot", "stride_kh", "stride_ot",
                                        "stride_oh", "stride_pt")}}
    constexprs = {"GROUP": group, "PAGE_SIZE": page_size, "HEAD_DIM": head_dim, "BLOCK_M": _BLOCK_M,
                  "BLOCK_N": _BLOCK_N, "BLOCK_D": _block_d(head_dim),
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


# (dtype, page_size, head_dim, GQA group) of the launches `python -m dash_kernels.aot` compiles: the paper presets
# (configs/qwen2.5-*-math.yaml: page size 256, bf16) for Qwen2.5-0.5B (14 query / 2 KV heads of 64: group 7) and
# 1.5B (12 / 2 of 128: group 6), the same models at the default page size 16, and the tiny fp32 model (4 / 2 of 32).
AOT_LAUNCHES = (
    ("bf16", 256, 64, 7), ("bf16", 256, 128, 6), ("bf16", 16, 64, 7), ("bf16", 16, 128, 6),
    ("fp16", 256, 128, 6), ("fp32", 16, 32, 2), ("fp32", 256, 64, 7), ("fp32", 256, 128, 6),
)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`, with the launcher's own
    num_warps / num_stages (fp32: full-precision dots, FMA instead of tensor cores)."""
    specs = []
    for dtype, page_size, head_dim, group in AOT_LAUNCHES:
        sig, const = AOT_SIGNATURE(dtype=dtype, page_size=page_size, head_dim=head_dim, group=group)
        specs.append((f"paged_attention[{dtype},p{page_size},d{head_dim},g{group}]", _paged_attention_kernel, sig,
                      const, {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs


def check_paged_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The memory layout the Triton kernel assumes, checked on the host (metadata only) before any launch: q's head
    dimension at unit stride (q[t, h] is read as D consecutive values) and contiguous caches (slot s of a layer is
    read at s * stride(1), which spans pages only when the pages are packed). Raises ValueError naming the tensor."""
    if q.stride(-1) != 1:
        raise ValueError(f"paged_attention: q must have unit stride on its last (head_dim) dimension, got strides "
                         f"{q.stride()}; pass q.contiguous()")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"paged_attention: {name} must be contiguous [num_pages, page_size, Hkv, D], got "
                             f"strides {cache.stride()} for shape {tuple(cache.shape)}")


@on_tensor_device
def paged_attention_fwd(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, max_q_len, scale):
    """Triton launcher; arguments as in `paged_attention` (cu_seqlens_q: [B+1] int32, max_q_len: host int)."""
    check_paged_layout(q, k_cache, v_cache)
    T, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    B = page_table.shape[0]
    if T == 0 or B == 0:
        return out
    grid = (B, Hq, triton.cdiv(max_q_len, _BLOCK_M))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, page_table, context_lens, cu_seqlens_q, scale,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        page_table.stride(0),
        GROUP=Hq // Hkv, PAGE_SIZE=page_size, HEAD_DIM=D,
        # The kernel computes in fp32 (operands upcast on load), where tl.dot defaults to TF32 (10-bit mantissa).
        # bf16 / fp16 caches lose nothing to TF32 (their values fit) and keep the tensor cores; an fp32 cache gets
        # full fp32 products ("ieee") unless torch itself allows TF32 matmuls, as in the fused log-prob kernels.
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=_block_d(D), DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def paged_attention_ref(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q=None, scale=None):
    """Torch reference and CPU path: gather each sequence's pages into [B, W*page_size], then masked SDPA.

    Decode (cu_seqlens_q None: one query per sequence) takes one batched SDPA call; with several queries per
    sequence the queries are scattered into a right-aligned [B, Lq_max] layout first.
    """
    T, Hq, D = q.shape
    B, W = page_table.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    S = W * page_size
    flat = page_table.reshape(-1)  # [B*W], any int dtype index_select accepts
    k = k_cache.index_select(0, flat).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = v_cache.index_select(0, flat).view(B, S, Hkv, D).transpose(1, 2)
    ctx = context_lens.to(torch.long)
    key_pos = torch.arange(S, device=q.device)  # [S]
    if cu_seqlens_q is None:  # decode
        mask = (key_pos[None, :] < ctx[:, None])[:, None, None, :]  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(q.view(B, Hq, 1, D), k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=Hq != Hkv)
        return out.view(B, Hq, D)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.long)  # [B]
    lq = int(q_lens.max()) if B else 0
    seq = torch.repeat_interleave(torch.arange(B, device=q.device), q_lens)  # [T]
    idx = torch.arange(T, device=q.device) - cu_seqlens_q.to(torch.long)[seq]  # [T] index within its sequence
    row = seq * lq + (lq - q_lens[seq]) + idx  # right-aligned: the last query of each sequence at column lq-1
    q_pad = q.new_zeros(B * lq, Hq, D).index_copy(0, row, q).view(B, lq, Hq, D).transpose(1, 2)
    q_pos = ctx[:, None] - lq + torch.arange(lq, device=q.device)[None, :]  # [B, lq] (pad rows: anything)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < ctx[:, None, None])
    mask = mask | (q_pos[:, :, None] < 0)  # pad query rows: see everything (finite), dropped below
    out = F.scaled_dot_product_attention(q_pad, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).reshape(B * lq, Hq, D).index_select(0, row)  # [T, Hq, D]


# When a fresh CPU prefill (no cached prefix) should read its K/V through the C++ kernel rather than varlen SDPA over
# the just-computed K/V (benchmarks/paged_attention.py, modes prefill / long / long-equal, 2026-11-25): the kernel
# computes one query token per task, SDPA runs a blocked flash kernel but pays per-(sequence, head) setup and pads
# every run to the longest. Short runs: the kernel wins 5-16x. Long runs: SDPA wins by 1.1-1.3x when all runs have
# the same length (256 tokens), the kernel wins ~1.9x on ragged 128..256-token runs, whose padding costs SDPA ~1.7x.
_SHORT_RUN = 64  # longest run (tokens) up to which the kernel is taken whatever the lengths
_PAD_COST = 1.5  # longer runs: the kernel when SDPA's padded work, B * Lmax^2, exceeds 1.5x the real sum of L^2


def cpu_prefill_prefers_pages(q_lens: torch.Tensor) -> bool:
    """For a prefill step without a cached prefix on fp32 CPU: True when `paged_attention` with query runs of these
    lengths (B,) is expected to beat varlen SDPA over the fresh K/V (see the measurements above)."""
    longest = int(q_lens.max())
    if longest <= _SHORT_RUN:
        return True
    lens = q_lens.to(torch.float64)
    return len(q_lens) * float(longest) ** 2 > _PAD_COST * float((lens * lens).sum())


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
                    scale: float | None = None, max_q_len: int | None = None) -> torch.Tensor:
    """Attention of new queries over a paged KV cache (their own K/V must already be stored).

    Args:
        q: (T, Hq, D) queries packed by sequence; T == B for decode (cu_seqlens_q None).
        k_cache, v_cache: (num_pages, page_size, Hkv, D); Hq must be a multiple of Hkv.
        page_table: (B, W) int32 physical page of each logical page; entries past a sequence's end are ignored
            but must be valid page ids (pad with 0).
        context_lens: (B,) int32 tokens in the cache per sequence, including the new ones.
        cu_seqlens_q: (B+1,) int32 query offsets, or None for one query per sequence.
        scale: softmax scale, default D ** -0.5.
        max_q_len: longest query run (host int) for the Triton grid; computed when None.

    Returns:
        (T, Hq, D) in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q must be [T, Hq, D] and caches [num_pages, page_size, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"paged_attention: q heads/dim {tuple(q.shape[1:])} do not fit cache {tuple(k_cache.shape)}")
    impl = backend.resolve(q.device)
    if impl == "triton":
        B = page_table.shape[0]
        if cu_seqlens_q is None:
            cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
            max_q_len = 1
        elif max_q_len is None:
            max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q = q if q.stride(-1) == 1 else q.contiguous()  # the kernel reads each head's D values at unit stride
        return paged_attention_fwd(q, k_cache, v_cache, page_table.to(torch.int32).contiguous(),
                                   context_lens.to(torch.int32), cu_seqlens_q.to(torch.int32), max_q_len, scale)
    if use_cpu_kernel(q, k_cache, v_cache):
        # fp32 CPU: the C++ loop reads the pages in place (no gather, no padding of query runs; ~6x faster than the
        # SDPA reference for decode at batch 256). The engine already passes contiguous int32 metadata, so the
        # conversions below are no-ops there.
        meta = [as_int32(t) for t in (page_table, context_lens, cu_seqlens_q)]
        return _C.paged_attention(q if q.is_contiguous() else q.contiguous(), k_cache, v_cache, *meta,
                                  q.shape[-1] ** -0.5 if scale is None else scale)
    return paged_attention_ref(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale)
