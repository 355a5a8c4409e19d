"""Paged attention: queries of B sequences attend to their keys/values stored in a paged KV cache.

One call serves decode (one query per sequence) and prefill with a cached prefix (several queries per sequence whose
K/V were stored before the call). Query i of sequence b sits at position `context_lens[b] - q_len_b + i` and sees the
keys at positions <= its own (causal). Any page size works: each key token finds its page through the page table.

Layers (one op per file): `_paged_attention_kernel` and `_paged_attention_combine_kernel` (Triton),
`paged_attention_fwd` (launcher), `paged_attention_ref` (pure torch: gather the pages into a dense [B, S] layout,
then SDPA with a mask; also the CPU path), and the public `paged_attention`. Inference only: there is no backward
(the sampler runs under `torch.inference_mode`).

Triton kernel (grouped-query layout): one program per (sequence, KV head, row block[, key split]). Its rows are the
(query token, query head) pairs of that KV head's group, so each K/V tile is loaded once for all the group's heads
(Qwen2.5-0.5B: 7 heads per KV head). Operands stay in the cache's dtype (bf16 / fp16 tensor-core dots with fp32
accumulation; fp32 caches keep fp32 operands). Decode splits long contexts over programs when the (sequence, KV head)
pairs alone would leave SMs idle (flash-decoding): each split writes its partial max / sum / unnormalised output,
and a second kernel combines them. The split count comes from `decode_num_splits` (host integers only).
docs/paged-attention.md describes the layout, the grid and the heuristic.

Backends: Triton on CUDA tensors (or anywhere under TRITON_INTERPRET=1 when `backend.override == "triton"`); on CPU,
fp32 decode and query runs go to the torch op `torch.ops.dash.paged_attention` (csrc/paged_attention_cpu.cpp: reads
the pages in place; its fake kernel is registered at the end of this module), everything else (other dtypes,
`backend.override == "reference"`) to the gather + SDPA reference.
Tests: `.venv/bin/python -m pytest tests/kernels/test_paged_attention.py -q` (the Triton kernel's matrix runs under
the interpreter from tests/kernels/interp_paged_cases.py, through test_triton_interpreter.py).
AOT-compile signatures for sm_80/sm_90: `AOT_SIGNATURE`, `AOT_COMBINE_SIGNATURE`, `aot_specs()`.
"""

import torch
import torch.nn.functional as F

from dash_kernels import backend
from dash_kernels._ext import HAS_C, as_int32, on_tensor_device, use_cpu_kernel
from dash_kernels.ops._triton_utils import dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

__all__ = ["cpu_prefill_prefers_pages", "decode_num_splits", "paged_attention", "paged_attention_fwd",
           "paged_attention_ref"]

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the scores are scaled once, the exponentials are exp2

# Launch shapes. Rows of a program are (query token, query head of the KV group) pairs, head fastest: row r is token
# r // GROUP, head kvh * GROUP + r % GROUP, so every K/V tile a program loads serves all the group's heads at once.
# Decode (one token per sequence): one block of max(16, GROUP) rows (tl.dot needs M >= 16); the context is split
# over programs when there are too few (sequence, KV head) pairs to fill the GPU (flash-decoding).
# Prefill / query runs: 16 or 32 rows per program (about 2 to 4 tokens of a 7-head group); never split.
# Sizes are the largest that compile for sm_80 / sm_90 with no spill in `python -m dash_kernels.aot`, which compiles
# without the JIT's 16-byte alignment hints (so with one address per element): K / V tiles of _KV_TILE_BYTES and
# prefill row blocks of _PREFILL_Q_ELEMS query elements; twice either spills at head_dim 128.
_DECODE_MIN_ROWS = 16
_KV_TILE_BYTES = 8192  # BLOCK_N * BLOCK_D * element size: 64 keys at bf16 head_dim 64, 32 at 128, 16 at fp32 128
_DECODE_MAX_BLOCK_N = 64
_PREFILL_MAX_BLOCK_N = 32
_PREFILL_Q_ELEMS = 2048  # BLOCK_M * BLOCK_D: 32 rows at head_dim 64, 16 at 128
_PREFILL_MAX_ROWS = 32
NUM_WARPS = 4
NUM_STAGES = 2  # key-loop pipelining depth (the per-head kernel before this one spilled with the default 3)
_COMBINE_NUM_WARPS = 4

# Split-K heuristic for decode (`decode_num_splits`): split until about _PROGRAMS_PER_SM programs per SM exist, but
# never into fewer than _MIN_KEYS_PER_SPLIT keys (each split costs one [Hq, D] fp32 partial write and its share of
# the combine pass), and into at most MAX_SPLITS (the combine kernel reads all splits of a row in one tile).
_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 16
_INTERPRETER_SMS = 8  # the SM count assumed off-GPU (Triton interpreter): small, so test contexts split too

if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q, K_cache, V_cache, Out, Part_acc, Part_m, Part_l, Page_table, Context_lens, Cu_seqlens_q, qk_scale,
        split_len, num_splits,
        stride_qt, stride_qh, stride_kslot, stride_kh, stride_ot, stride_oh, stride_pt,
        GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Program (b, kvh, m_block * num_splits + split): rows m_block of sequence b's (token, group head) pairs,
        # keys [split * split_len, (split + 1) * split_len) of its context. qk_scale = softmax scale * log2(e).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        m_block = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
        q_start = tl.load(Cu_seqlens_q + b)
        q_len = tl.load(Cu_seqlens_q + b + 1) - q_start
        n_rows = q_len * GROUP
        if m_block * BLOCK_M >= n_rows:
            return
        ctx = tl.load(Context_lens + b)
        offs_r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = offs_r // GROUP  # [BLOCK_M] query token within the run
        head = kvh * GROUP + offs_r % GROUP  # [BLOCK_M] query head
        offs_d = tl.arange(0, BLOCK_D)
        r_ok = offs_r < n_rows
        d_ok = offs_d < HEAD_DIM
        q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(Q + q_off, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D], q's dtype
        q_pos = ctx - q_len + tok  # absolute position of each row's query (causal bound)
        last_tok = (tl.minimum(n_rows, (m_block + 1) * BLOCK_M) - 1) // GROUP
        kv_end = ctx - q_len + last_tok + 1  # later keys are masked for every row of the block
        kv_lo = split * split_len
        kv_hi = tl.minimum(kv_end, kv_lo + split_len)
        # Online softmax (flash-attention) in base 2: running max m_i, running sum l_i, unnormalised output acc.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(kv_lo, kv_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_hi
            page = tl.load(Page_table + b * stride_pt + offs_n // PAGE_SIZE, mask=n_ok, other=0)  # [BLOCK_N]
            slot = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
            kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + offs_d[None, :]  # D contiguous per key
            k = tl.load(K_cache + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(V_cache + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            # Operands in the cache's dtype (bf16 / fp16: tensor cores, fp32 accumulation); fp32 caches keep
            # fp32 operands with DOT_PRECISION ("ieee" unless torch allows TF32).
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row must not give NaN
            # p rounded to V's dtype for the second tensor-core dot; the row sum uses the same rounded weights, so
            # the output is an exact weighted mean of V under slightly perturbed weights (no rounding bias).
            p = tl.exp2(s - m_safe[:, None]).to(v.dtype)
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new
        row = (q_start + tok).to(tl.int64) * (tl.num_programs(1) * GROUP) + head  # [BLOCK_M] (token, head) index
        if num_splits == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
            tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
        else:  # partial results of this split, [T, Hq, num_splits(, D)] fp32; an empty split writes (-inf, 0, 0)
            part = row * num_splits + split
            tl.store(Part_m + part, m_i, mask=r_ok)
            tl.store(Part_l + part, l_i, mask=r_ok)
            tl.store(Part_acc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _paged_attention_combine_kernel(
        Part_acc, Part_m, Part_l, Out, num_splits, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (t, h): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
        t = tl.program_id(0)
        h = tl.program_id(1)
        row = t.to(tl.int64) * tl.num_programs(1) + h
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < num_splits
        d_ok = offs_d < HEAD_DIM
        m = tl.load(Part_m + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
        l = tl.load(Part_l + row * num_splits + offs_s, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: weight 0
        acc = tl.load(Part_acc + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        l_tot = tl.sum(w * l, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(l_tot == 0.0, 1.0, l_tot)
        tl.store(Out + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))  # tl.dot needs every dimension >= 16


def _blocks(decode: bool, group: int, head_dim: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a launch (see the launch-shape constants above); every size a power of two >= 16."""
    block_d = _block_d(head_dim)
    keys = max(16, _KV_TILE_BYTES // (block_d * elem_bytes))
    if decode:
        return max(_DECODE_MIN_ROWS, _next_pow2(group)), min(_DECODE_MAX_BLOCK_N, keys)
    return (max(16, _next_pow2(group), min(_PREFILL_MAX_ROWS, _PREFILL_Q_ELEMS // block_d)),
            min(_PREFILL_MAX_BLOCK_N, keys))


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Into how many key ranges a decode call splits each sequence's context (flash-decoding).

    One program per (sequence, KV head, split). Splitting pays when the (sequence, KV head) pairs alone leave SMs
    idle (small batches, long contexts): aim at _PROGRAMS_PER_SM programs per SM, keep at least
    _MIN_KEYS_PER_SPLIT keys per split and at most MAX_SPLITS. Host integers only: max_context is the page table's
    width times the page size (no device read, so the choice is fixed for a captured CUDA graph's shapes).
    Examples at 132 SMs (H100): 256 sequences x 2 KV heads -> 1 (512 programs already); 8 x 2 at 1k keys -> 8.
    """
    programs = num_seqs * num_kv_heads
    if programs <= 0 or max_context <= 0:
        return 1
    want = -(-_PROGRAMS_PER_SM * num_sms // programs)
    by_len = max(1, max_context // _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_len, MAX_SPLITS))


_SM_COUNTS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_I32_ARGS = ("split_len", "num_splits", "stride_qt", "stride_qh", "stride_kslot", "stride_kh", "stride_ot",
             "stride_oh", "stride_pt")


def AOT_SIGNATURE(dtype: str = "fp16", page_size: int = 16, head_dim: int = 128, group: int = 1,
                  decode: bool = True) -> tuple[dict, dict]:
    """(signature, constexprs) for `triton.compile(ASTSource(fn=_paged_attention_kernel, ...))` on sm_80 / sm_90."""
    sig = {"Q": f"*{dtype}", "K_cache": f"*{dtype}", "V_cache": f"*{dtype}", "Out": f"*{dtype}",
           "Part_acc": "*fp32", "Part_m": "*fp32", "Part_l": "*fp32",
           "Page_table": "*i32", "Context_lens": "*i32", "Cu_seqlens_q": "*i32", "qk_scale": "fp32",
           **{name: "i32" for name in _I32_ARGS}}
    block_m, block_n = _blocks(decode, group, head_dim, 4 if dtype == "fp32" else 2)
    constexprs = {"GROUP": group, "PAGE_SIZE": page_size, "HEAD_DIM": head_dim, "BLOCK_M": block_m,
                  "BLOCK_N": block_n, "BLOCK_D": _block_d(head_dim),
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


def AOT_COMBINE_SIGNATURE(dtype: str = "fp16", head_dim: int = 128) -> tuple[dict, dict]:
    """(signature, constexprs) of `_paged_attention_combine_kernel` (the second pass of a split decode)."""
    sig = {"Part_acc": "*fp32", "Part_m": "*fp32", "Part_l": "*fp32", "Out": f"*{dtype}", "num_splits": "i32",
           "stride_ot": "i32", "stride_oh": "i32"}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_S": MAX_SPLITS, "BLOCK_D": _block_d(head_dim)}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


# (dtype, page_size, head_dim, GQA group) of the launches `python -m dash_kernels.aot` compiles, each as decode and
# as prefill: the paper presets (configs/qwen2.5-*-math.yaml: page size 256, bf16) for Qwen2.5-0.5B (14 query / 2 KV
# heads of 64: group 7) and 1.5B (12 / 2 of 128: group 6), the same models at the default page size 16, and the
# tiny fp32 model (4 / 2 of 32).
AOT_LAUNCHES = (
    ("bf16", 256, 64, 7), ("bf16", 256, 128, 6), ("bf16", 16, 64, 7), ("bf16", 16, 128, 6),
    ("fp16", 256, 128, 6), ("fp32", 16, 32, 2), ("fp32", 256, 64, 7), ("fp32", 256, 128, 6),
)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`, with the launcher's own
    num_warps / num_stages (fp32: full-precision dots, FMA instead of tensor cores)."""
    specs = []
    options = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    for dtype, page_size, head_dim, group in AOT_LAUNCHES:
        for decode in (True, False):
            sig, const = AOT_SIGNATURE(dtype, page_size, head_dim, group, decode)
            specs.append((f"paged_attention[{'decode' if decode else 'prefill'},{dtype},p{page_size},d{head_dim},"
                          f"g{group}]", _paged_attention_kernel, sig, const, options))
    for dtype, head_dim in sorted({(dtype, head_dim) for dtype, _, head_dim, _ in AOT_LAUNCHES}):
        sig, const = AOT_COMBINE_SIGNATURE(dtype, head_dim)
        specs.append((f"paged_attention_combine[{dtype},d{head_dim}]", _paged_attention_combine_kernel, sig, const,
                      {"num_warps": _COMBINE_NUM_WARPS, "num_stages": NUM_STAGES}))
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
def paged_attention_fwd(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, max_q_len, scale,
                        num_splits=None):
    """Triton launcher; arguments as in `paged_attention` (cu_seqlens_q: [B+1] int32, max_q_len: host int).

    Decode (max_q_len == 1) splits each context into `num_splits` key ranges (None: `decode_num_splits`), then
    combines the partial results in a second kernel; query runs (max_q_len > 1) are never split.
    """
    check_paged_layout(q, k_cache, v_cache)
    T, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    B, W = page_table.shape
    if T == 0 or B == 0:
        return out
    group = Hq // Hkv
    decode = max_q_len == 1
    block_m, block_n = _blocks(decode, group, D, q.element_size())
    max_context = W * page_size  # host bound on every context of the call: the page table holds it
    if not decode:
        num_splits = 1
    elif num_splits is None:
        num_splits = decode_num_splits(B, Hkv, max_context, _num_sms(q.device))
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_attention_fwd: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    # Keys per split, a multiple of the key tile so splits start on tile boundaries; the count is then recomputed
    # (rounding up the length may leave fewer non-empty splits).
    split_len = triton.cdiv(triton.cdiv(max_context, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context, split_len)
    if num_splits > 1:
        part_m = torch.empty(T, Hq, num_splits, device=q.device, dtype=torch.float32)  # [T, Hq, S] running max
        part_l = torch.empty_like(part_m)  # [T, Hq, S] running sum
        part_acc = torch.empty(T, Hq, num_splits, D, device=q.device, dtype=torch.float32)  # [T, Hq, S, D]
    else:  # unused by the kernel (its num_splits == 1 branch): any fp32 pointer keeps the AOT signature
        part_m = part_l = part_acc = torch.empty(1, device=q.device, dtype=torch.float32)
    grid = (B, Hkv, triton.cdiv(max_q_len * group, block_m) * num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, page_table, context_lens, cu_seqlens_q,
        scale * _LOG2E, split_len, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        page_table.stride(0),
        GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        # 16-bit caches: tl.dot on bf16 / fp16 operands accumulates in fp32 (the precision argument is ignored).
        # An fp32 cache gets full fp32 products ("ieee") unless torch itself allows TF32 matmuls, as in the fused
        # log-prob kernels.
        DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if num_splits > 1:
        _paged_attention_combine_kernel[(T, Hq)](
            part_acc, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_S=MAX_SPLITS, BLOCK_D=_block_d(D), num_warps=_COMBINE_NUM_WARPS, num_stages=NUM_STAGES,
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
        return torch.ops.dash.paged_attention(q if q.is_contiguous() else q.contiguous(), k_cache, v_cache, *meta,
                                              q.shape[-1] ** -0.5 if scale is None else scale)
    return paged_attention_ref(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale)


if HAS_C:
    @torch.library.register_fake("dash::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale):
        return torch.empty_like(q)  # [T, Hq, D]
