"""token_logprobs backward (Triton): the gradients of log p(y_t) and the entropy w.r.t. hidden, weight and bias.

A file of its own because of its chunking and memory plan: it never holds the [N, V] logits gradient, so it cuts the
vocabulary into chunks of Vc columns and plans, per call, the chunk width, the dW row splits (split-K) and the extra
memory those need (`backward_plan`; docs/fused-loss.md). The forward, the autograd Function and the public function
are in token_logprobs.py; the torch backend (`_chunked.sweep`) is the fallback for both.

Over the rows whose upstream gradient is non-zero only, vocab chunk by vocab chunk, three kernels per chunk and no
contended atomics:
  1. `_token_logprobs_bwd_kernel`, grid (row block) x (vocab tile): recomputes the logits tile and stores
     dz = [g (onehot - p) - gH p (z - sum p z)] / tau into a [n, Vc] buffer in the operand dtype.
  2. `_token_logprobs_dh_kernel`, grid (row block) x (H tile): dH = dz @ W[chunk], added to an fp32 running sum that
     each tile owns; the last chunk writes dh in hidden's dtype.
  3. `_token_logprobs_dw_kernel`, grid (vocab tile) x (H tile) x (S row splits): dW[chunk] = dz^T h, each program
     looping over its rows; with S = 1 it writes its tile once, in the weight's dtype. S > 1 (split-K, when the
     chunk has too few tiles to fill the GPU) writes S fp32 partial planes summed once in a fixed order
     (deterministic mode, `deterministic_mode()`), or adds into one plane with relaxed atomics (default: S adds per
     element, S <= MAX_DW_SPLITS).
The atomic backward this replaces had every (row block x vocab tile) program add its dH and dW tiles with fp32
acq_rel atomics, all row blocks hitting the same dW rows and all vocab tiles the same dH rows, plus an fp32 [V, H]
accumulator. Cost: 6nHV FLOPs on live rows (the forward's 2nHV recomputed, then the two gradient GEMMs), plus
3 n V e bytes of dz traffic and n H 8 bytes of dH read-modify-write per chunk. Memory: see `backward_plan`.

Design limits: rows with targets == ignore_index are never passed in (the autograd Function drops them); dh, dw and
db come back in the input's / parameter's dtype from Triton, fp32 from the torch backend.
Checked by: pytest tests/kernels/test_fused_bwd_plan.py (the plan); TRITON_INTERPRET=1 DASH_KERNELS_BACKEND=triton
pytest tests/kernels/interp_fused_bwd_cases.py (the kernels on CPU); python -m dash_kernels.aot (compiled, sm_80/90).
"""

from typing import NamedTuple

import torch

from dash_kernels._ext import on_tensor_device
from dash_kernels.ops import _chunked
from dash_kernels.ops._triton_utils import (
    LOGITS_AOT_VARIANTS,
    all_rows,
    deterministic_mode,
    dot_precision,
    jit,
    logits_tile,
    logits_tile_signature,
    num_programs_target,
    offsets_2d,
    pick_config,
    tl,
    triton,
)

# Tile sizes per operand dtype, the largest that compile without register spills for both sm_80 and sm_90 (checked by
# `python -m dash_kernels.aot`). fp32 operands go through an IEEE fp32 dot (FMA, no tensor cores, unless torch allows
# TF32), whose operand fragments cost far more registers than a bf16 MMA, hence the smaller tiles.
BWD_CONFIGS = {  # backward pass 1, the logits gradient: the forward's GEMM with an elementwise epilogue and a store
    "fp32": {"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
}
DH_CONFIGS = {  # backward pass 2, dH = dz @ W: a plain GEMM, K = the chunk's vocabulary
    "fp32": {"BLOCK_M": 32, "BLOCK_V": 32, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_H": 128, "num_warps": 8, "num_stages": 3},
}
DW_CONFIGS = {  # backward pass 3, dW = dz^T h: a plain GEMM, K = the live rows (of one split)
    "fp32": {"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
}
DZ_CHUNK_BYTES = 128 * 2**20
"""Budget of the backward's [n, Vc] logits-gradient buffer. Smaller chunks cost more dH read-modify-writes
(n H 8 bytes per chunk: at Vc = 4096 and H = 896 that traffic is ~30% of the dz traffic, 3 n V e bytes, itself
small next to the 6 n H V FLOPs); 128 MiB keeps the backward's extra memory under 5% of the naive [N, V] bf16 logits
at N = 16384, V = 151936 (see `backward_plan`)."""
DZ_CHUNK_ALIGN = 128  # chunk widths are a multiple of every BLOCK_V above, so only the last chunk has a ragged tile
MAX_DW_SPLITS = 8
"""At most this many row splits (split-K) of the dW reduction, i.e. partial planes (deterministic mode) or atomic
adds per element (default mode). Splits only fill the GPU when the chunk has few (vocab x H) tiles."""


# ----------------------------------------------------------------------------------------------------- kernels
@jit
def _token_logprobs_bwd_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, norm_ptr, neg_ent_ptr,
                               c_ptr, ch_ptr, dz_ptr,
                               n_rows, v_start, v_end, dz_stride, hdim,
                               stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                               HAS_BIAS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward pass 1 of 3: dz[sel, cols - v_start] (the logits gradient of one vocab chunk, in the operand dtype)
    for a (row block) x (vocab tile) of the chunk. Every element is written by exactly one program."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    sel = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] positions in the live-row list
    sel_mask = sel < n_rows
    rows = tl.load(rows_ptr + sel, mask=sel_mask, other=0)  # [BM] int64
    y = tl.load(targets_ptr + rows, mask=sel_mask, other=-1)
    # log p = (z - m) - log s with the row max m and log s saved apart: z - m is exact for the top logits, so a
    # confident token's p (and 1 - p) keeps full precision, which z - lse (lse ~ 15, ulp ~ 1e-6) would not.
    row_max = tl.load(norm_ptr + 2 * sel, mask=sel_mask, other=0.0)
    log_s = tl.load(norm_ptr + 2 * sel + 1, mask=sel_mask, other=0.0)
    c = tl.load(c_ptr + sel, mask=sel_mask, other=0.0)  # dL/dlogp / tau
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV] column in the chunk
    cols = v_start + local
    col_mask = cols < v_end
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, sel_mask, cols, col_mask, hdim,
                     stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                     HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION)
    log_p = (z - row_max[:, None]) - log_s[:, None]
    p = tl.where(sel_mask[:, None] & col_mask[None, :], tl.exp(log_p), 0.0)  # [BM, BV]
    # dL/dz = c (onehot - p) - cH p (z - sum p z); z - sum p z = log_p - sum p log_p = log_p + H.
    dz = tl.where(cols[None, :] == y[:, None], c[:, None], 0.0) - c[:, None] * p
    if HAS_ENTROPY_GRAD:
        ch = tl.load(ch_ptr + sel, mask=sel_mask, other=0.0)
        neg_ent = tl.load(neg_ent_ptr + sel, mask=sel_mask, other=0.0)
        dz -= ch[:, None] * p * (log_p - neg_ent[:, None])
    # Stored in the operand dtype (bf16 for bf16 inputs): the tensor-core operand of both gradient GEMMs, as the
    # fused kernel this replaces also rounded it; accumulation stays fp32.
    tl.store(dz_ptr + offsets_2d(sel, dz_stride, local, 1), dz.to(dz_ptr.dtype.element_ty),
             mask=sel_mask[:, None] & col_mask[None, :])


@jit
def _token_logprobs_dh_kernel(dz_ptr, weight_ptr, rows_ptr, acc_ptr, dh_ptr,
                              n_rows, v_start, v_end, dz_stride, hdim, stride_wv, stride_wh, accumulate, final,
                              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """Backward pass 2 of 3: dH[sel, ks] (+)= dz[sel, :] @ W[chunk, ks], one program per (row block) x (H tile), the
    K loop over the chunk's vocabulary. Chunks run one after another (stream order), so the fp32 running sum in
    acc_ptr [n, H] has one writer at a time and a fixed order: no atomics. The last chunk writes dh [N, H] (hidden's
    dtype) at the real row ids instead."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    sel = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    sel_mask = sel < n_rows
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    k_mask = ks < hdim
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for v in range(v_start, v_end, BLOCK_V):
        local = v - v_start + tl.arange(0, BLOCK_V)  # [BV]
        col_mask = v + tl.arange(0, BLOCK_V) < v_end
        dz = tl.load(dz_ptr + offsets_2d(sel, dz_stride, local, 1), mask=sel_mask[:, None] & col_mask[None, :],
                     other=0.0)  # [BM, BV]
        w = tl.load(weight_ptr + offsets_2d(v + tl.arange(0, BLOCK_V), stride_wv, ks, stride_wh),
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BV, BH]
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
    mask = sel_mask[:, None] & k_mask[None, :]
    if accumulate:
        acc += tl.load(acc_ptr + offsets_2d(sel, hdim, ks, 1), mask=mask, other=0.0)
    if final:
        rows = tl.load(rows_ptr + sel, mask=sel_mask, other=0)  # [BM] int64
        tl.store(dh_ptr + offsets_2d(rows, hdim, ks, 1), acc.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + offsets_2d(sel, hdim, ks, 1), acc, mask=mask)


@jit
def _token_logprobs_dw_kernel(dz_ptr, hidden_ptr, rows_ptr, dw_ptr, db_ptr,
                              n_rows, v_start, v_end, dz_stride, hdim, rows_per_split, out_row0, split_stride,
                              db_split_stride, stride_hn, stride_hh,
                              NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ATOMIC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """Backward pass 3 of 3: dW[cols, ks] = sum over rows of dz[rows, cols]^T h[rows, ks] (and db[cols] = column sums
    of dz), one program per (vocab tile) x (H tile) x (row split), looping over its split's row blocks. With one
    split the program owns its dW tile outright and writes it once, in the weight's dtype (no fp32 [V, H] buffer);
    with S splits it writes fp32 partials at plane pid_s (summed once, in a fixed order, by the launcher), or, when
    ATOMIC, adds them into one fp32 plane with relaxed atomics: S adds per element (S <= MAX_DW_SPLITS), from
    programs that are far apart in the grid, so the contention the old backward had (every row block hitting the
    same dW rows) is gone, but the order of the S adds is not fixed."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    cols = v_start + local
    col_mask = cols < v_end
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    k_mask = ks < hdim
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    m0 = pid_s * rows_per_split
    m1 = tl.minimum(n_rows, m0 + rows_per_split)
    for m in range(m0, m1, BLOCK_M):
        sel = m + tl.arange(0, BLOCK_M)  # [BM]
        sel_mask = sel < m1
        dz = tl.load(dz_ptr + offsets_2d(sel, dz_stride, local, 1), mask=sel_mask[:, None] & col_mask[None, :],
                     other=0.0)  # [BM, BV]
        if NEED_DW:
            rows = tl.load(rows_ptr + sel, mask=sel_mask, other=0)  # [BM] int64
            h = tl.load(hidden_ptr + offsets_2d(rows, stride_hn, ks, stride_hh),
                        mask=sel_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BH]
            acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
        if NEED_DB:
            db += tl.sum(dz.to(tl.float32), 0)
    out = pid_s.to(tl.int64) * split_stride + offsets_2d(cols - out_row0, hdim, ks, 1)  # [BV, BH]
    mask = col_mask[:, None] & k_mask[None, :]
    if NEED_DW:
        if ATOMIC:
            tl.atomic_add(dw_ptr + out, acc, mask=mask, sem="relaxed")
        else:
            tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        if pid_h == 0:  # one H tile per vocab tile owns db
            db_out = pid_s.to(tl.int64) * db_split_stride + (cols - out_row0)
            if ATOMIC:
                tl.atomic_add(db_ptr + db_out, db, mask=col_mask, sem="relaxed")
            else:
                tl.store(db_ptr + db_out, db.to(db_ptr.dtype.element_ty), mask=col_mask)


# -------------------------------------------------------------------------------------------------------- plan
class BackwardPlan(NamedTuple):
    """How the Triton backward cuts its work (see `backward_plan`).

    Attributes:
        chunk_v: vocabulary columns per chunk (Vc); the dz buffer is [n, Vc].
        n_chunks: ceil(V / Vc) chunks, run one after another.
        dw_splits: S, row splits of the dW reduction (split-K); 1 = each program owns its dW tile.
        rows_per_split: rows of the live-row list per split (a multiple of the dW kernel's BLOCK_M).
        extra_bytes: device memory the backward allocates beyond its inputs and the gradients it returns.
    """

    chunk_v: int
    n_chunks: int
    dw_splits: int
    rows_per_split: int
    extra_bytes: int


def backward_plan(n, V, H, dtype, programs, deterministic, need_dh=True, need_db=False):
    """The chunking of the backward for n live rows, a [V, H] head in `dtype`, `programs` (about 4 per SM) to fill.

    Extra memory, beyond inputs and returned gradients (e = 2 bytes for bf16/fp16 operands, 4 for fp32):

        dz chunk            n * Vc * e           Vc = V if n V e <= DZ_CHUNK_BYTES, else DZ_CHUNK_BYTES / (n e)
                                                 rounded down to a multiple of DZ_CHUNK_ALIGN
        dH running sum      n * H * 4            only when n_chunks > 1 (fp32, summed chunk after chunk)
        dW split-K partials S * Vc * H * 4       deterministic mode, only when S > 1 (fixed-order sum, in place)
                            Vc * H * 4           default mode, only when S > 1 (relaxed atomics into one plane)
        db partials         the same with H = 1, only for a bias

    At N = 16384, H = 896, V = 151936 in bf16 with 528 programs (H100: 132 SMs): Vc = 4096, 38 chunks, S = 2, so
    128 MiB + 56 MiB + 28 MiB = 212 MiB deterministic (4.5% of the naive path's bf16 [N, V] logits alone, 4.98 GB;
    the naive path also holds fp32 softmax and gradient buffers), 198 MiB (4.2%) in the default mode. The fp32
    [V, H] dW accumulator of the atomic backward (544 MiB here) is gone: each dW tile is written once.
    """
    e = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    if n * V * e <= DZ_CHUNK_BYTES:
        chunk_v = V
    else:
        chunk_v = min(V, max(DZ_CHUNK_ALIGN, DZ_CHUNK_BYTES // (n * e) // DZ_CHUNK_ALIGN * DZ_CHUNK_ALIGN))
    n_chunks = -(-V // chunk_v) if V else 0
    cfg = pick_config(DW_CONFIGS, dtype)
    tiles = -(-chunk_v // cfg["BLOCK_V"]) * -(-H // cfg["BLOCK_H"])
    row_blocks = -(-n // cfg["BLOCK_M"])
    splits = max(1, min(MAX_DW_SPLITS, row_blocks, -(-programs // max(tiles, 1))))
    rows_per_split = -(-row_blocks // splits) * cfg["BLOCK_M"]
    splits = max(1, -(-n // rows_per_split))
    planes = 0 if splits == 1 else (splits if deterministic else 1)
    extra = n * chunk_v * e + planes * chunk_v * (H + (1 if need_db else 0)) * 4
    if need_dh and n_chunks > 1:
        extra += n * H * 4
    return BackwardPlan(chunk_v, n_chunks, splits, rows_per_split, extra)


# --------------------------------------------------------------------------------------------------- launchers
@on_tensor_device
def token_logprobs_bwd(hidden, weight, bias, targets, rows, norm, entropy, grad_logp, grad_entropy, inv_temp,
                       backend, need_dh, need_dw, need_db, deterministic=None):
    """Gradients (dh [N, H] in hidden's dtype; dw [V, H] and db [V] in the parameter's dtype from the Triton
    backend, fp32 from the torch one; None when not needed) given the upstream gradients grad_logp / grad_entropy
    ([n], for the selected rows; grad_entropy may be None). deterministic: None = `deterministic_mode()`."""
    if backend == "torch":
        def coef_fn(lo, hi, *_):
            return grad_logp[lo:hi], None if grad_entropy is None else grad_entropy[lo:hi]

        *_, dh, dw, db = _chunked.sweep(hidden, weight, bias, targets, rows, inv_temp, coef_fn=coef_fn,
                                        saved=entropy, entropy_grad=grad_entropy is not None, need_dh=need_dh,
                                        need_dw=need_dw, need_db=need_db)
        return dh, dw, db
    deterministic = deterministic_mode() if deterministic is None else deterministic
    every_row = rows is None or rows.numel() == hidden.shape[0]  # rows are distinct ids: all N of them
    rows = all_rows(rows, hidden.shape[0], hidden.device)
    n, V, H = rows.numel(), weight.shape[0], weight.shape[1]
    dev = hidden.device
    # The kernels write every element of dw / db, and of dh when every row is live; the rest of dh stays 0.
    alloc_w = torch.empty if n else torch.zeros
    alloc_h = torch.empty if n and every_row else torch.zeros
    dh = alloc_h(hidden.shape[0], H, dtype=hidden.dtype, device=dev) if need_dh else None
    dw = alloc_w(V, H, dtype=weight.dtype, device=dev) if need_dw else None
    db = alloc_w(V, dtype=bias.dtype, device=dev) if need_db else None
    if n:
        c = (grad_logp.float() * inv_temp).contiguous()  # [n]
        ch = None if grad_entropy is None else (grad_entropy.float() * inv_temp).contiguous()
        _backward_chunks(hidden, weight, bias, targets, rows, norm.contiguous(), -entropy, c, ch, inv_temp, dh, dw,
                         db, deterministic)
    return dh, dw, db


def _backward_chunks(hidden, weight, bias, targets, rows, norm, neg_ent, c, ch, inv_temp, dh, dw, db, deterministic):
    """The three backward kernels, vocab chunk by vocab chunk (`backward_plan` says how many and how wide)."""
    n, V, H = rows.numel(), weight.shape[0], weight.shape[1]
    dev, prec = hidden.device, dot_precision(hidden.dtype)
    plan = backward_plan(n, V, H, hidden.dtype, num_programs_target(dev), deterministic, dh is not None,
                         db is not None)
    Vc, S = plan.chunk_v, plan.dw_splits
    zc, hc, wc = (pick_config(t, hidden.dtype) for t in (BWD_CONFIGS, DH_CONFIGS, DW_CONFIGS))
    dz = torch.empty(n, Vc, dtype=hidden.dtype, device=dev)  # [n, Vc] the chunk's logits gradient
    acc = torch.empty(n, H, dtype=torch.float32, device=dev) if dh is not None and plan.n_chunks > 1 else None
    planes = S if deterministic else 1  # partial planes: S of them, or one that the S splits add into
    part_w = torch.empty(planes, Vc, H, dtype=torch.float32, device=dev) if S > 1 and dw is not None else None
    part_b = torch.empty(planes, Vc, dtype=torch.float32, device=dev) if S > 1 and db is not None else None
    atomic = S > 1 and not deterministic
    dummy = c
    for i, v0 in enumerate(range(0, V, Vc)):
        v1 = min(V, v0 + Vc)
        _token_logprobs_bwd_kernel[(triton.cdiv(n, zc["BLOCK_M"]), triton.cdiv(v1 - v0, zc["BLOCK_V"]))](
            hidden, weight, bias if bias is not None else hidden, targets, rows, norm, neg_ent, c,
            ch if ch is not None else dummy, dz, n, v0, v1, Vc, H,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_temp,
            HAS_BIAS=bias is not None, HAS_ENTROPY_GRAD=ch is not None, DOT_PRECISION=prec, **zc)
        if dh is not None:
            _token_logprobs_dh_kernel[(triton.cdiv(n, hc["BLOCK_M"]), triton.cdiv(H, hc["BLOCK_H"]))](
                dz, weight, rows, acc if acc is not None else dummy, dh, n, v0, v1, Vc, H,
                weight.stride(0), weight.stride(1), int(i > 0), int(v1 == V), DOT_PRECISION=prec, **hc)
        if dw is None and db is None:
            continue
        if atomic:
            for part in (part_w, part_b):
                if part is not None:
                    part.zero_()
        out_w = dw if S == 1 else part_w
        out_b = db if S == 1 else part_b
        _token_logprobs_dw_kernel[(triton.cdiv(v1 - v0, wc["BLOCK_V"]), triton.cdiv(H, wc["BLOCK_H"]), S)](
            dz, hidden, rows, out_w if out_w is not None else dummy, out_b if out_b is not None else dummy,
            n, v0, v1, Vc, H, plan.rows_per_split, 0 if S == 1 else v0, Vc * H if planes > 1 else 0,
            Vc if planes > 1 else 0, hidden.stride(0), hidden.stride(1),
            NEED_DW=dw is not None, NEED_DB=db is not None, ATOMIC=atomic, DOT_PRECISION=prec, **wc)
        if S > 1:
            for part, out in ((part_w, dw), (part_b, db)):
                if part is not None:
                    total = part[0, : v1 - v0]
                    for s in range(1, part.shape[0]):  # a fixed order: split 0 + 1 + 2 ..., in place
                        total += part[s, : v1 - v0]
                    out[v0:v1].copy_(total)


# ------------------------------------------------------------------------------------------------------- AOT specs
def aot_specs():
    """The backward kernel variants the launchers above use, as (name, kernel, signature, constexprs, options) for
    the ahead-of-time compile check (`python -m dash_kernels.aot`)."""
    specs = []
    for label, dt, tt, prec in LOGITS_AOT_VARIANTS:
        common, strides = logits_tile_signature(dt)
        bwd_full = pick_config(BWD_CONFIGS, tt)
        bwd_cfg = {k: v for k, v in bwd_full.items() if k.startswith("BLOCK")}
        bwd_sig = {**common, "norm_ptr": "*fp32", "neg_ent_ptr": "*fp32", "c_ptr": "*fp32", "ch_ptr": "*fp32",
                   "dz_ptr": f"*{dt}", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "dz_stride": "i32",
                   "hdim": "i32", **strides}
        for has_ent in (False, True):
            const = {"HAS_BIAS": False, "HAS_ENTROPY_GRAD": has_ent, **bwd_cfg, "DOT_PRECISION": prec}
            specs.append((f"token_logprobs_bwd[{label}{',entropy' if has_ent else ''}]", _token_logprobs_bwd_kernel,
                          {**bwd_sig, **{k: "constexpr" for k in const}}, const,
                          {"num_warps": bwd_full["num_warps"], "num_stages": bwd_full["num_stages"]}))
        dh_full = pick_config(DH_CONFIGS, tt)
        const = {**{k: v for k, v in dh_full.items() if k.startswith("BLOCK")}, "DOT_PRECISION": prec}
        dh_sig = {"dz_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "rows_ptr": "*i64", "acc_ptr": "*fp32",
                  "dh_ptr": f"*{dt}", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "dz_stride": "i32",
                  "hdim": "i32", "stride_wv": "i32", "stride_wh": "i32", "accumulate": "i32", "final": "i32"}
        specs.append((f"token_logprobs_bwd_dh[{label}]", _token_logprobs_dh_kernel,
                      {**dh_sig, **{k: "constexpr" for k in const}}, const,
                      {"num_warps": dh_full["num_warps"], "num_stages": dh_full["num_stages"]}))
        dw_full = pick_config(DW_CONFIGS, tt)
        # One split writes dW in the weight's dtype; S splits write fp32 partial planes, or add into one (ATOMIC).
        variants = [(dt, False), ("fp32", True)] + ([("fp32", False)] if dt != "fp32" else [])  # fp32: direct = planes
        for out, atomic in variants:
            const = {"NEED_DW": True, "NEED_DB": False, "ATOMIC": atomic,
                     **{k: v for k, v in dw_full.items() if k.startswith("BLOCK")}, "DOT_PRECISION": prec}
            # db_ptr: without a bias the launcher passes a placeholder fp32 tensor, never read.
            dw_sig = {"dz_ptr": f"*{dt}", "hidden_ptr": f"*{dt}", "rows_ptr": "*i64", "dw_ptr": f"*{out}",
                      "db_ptr": "*fp32", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "dz_stride": "i32",
                      "hdim": "i32", "rows_per_split": "i32", "out_row0": "i32", "split_stride": "i32",
                      "db_split_stride": "i32", "stride_hn": "i32", "stride_hh": "i32"}
            tag = ",atomic" if atomic else ("" if out == dt else ",partials")
            specs.append((f"token_logprobs_bwd_dw[{label}{tag}]", _token_logprobs_dw_kernel,
                          {**dw_sig, **{k: "constexpr" for k in const}}, const,
                          {"num_warps": dw_full["num_warps"], "num_stages": dw_full["num_stages"]}))
    return specs
