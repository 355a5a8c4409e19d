"""token_logprobs: log p(y_t) (and the entropy) of a linear head's softmax, without ever holding the N x V logits.

    z = (h W^T + b) / tau          lse = logsumexp_j z_j          logp = z_y - lse          H = lse - sum_j p_j z_j

Forward (Triton): a 2-D grid of (row block) x (vocab split). Each program streams its split's vocab tiles through
the GEMM and keeps, per row, a running max m, sum of exp s, sum of exp * (z - m) and the target logit; the splits'
partials ([4, n, n_splits] fp32) are merged in torch. Splitting the vocab keeps a GPU busy when N is small; the merge
is deterministic (no locks), unlike a spin-locked global LSE.

Backward (Triton), over the rows whose upstream gradient is non-zero only, vocab chunk by vocab chunk (Vc columns,
`backward_plan`), three kernels per chunk and no contended atomics:
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

Torch backend: `_chunked.sweep`, the same algorithm in row chunks (see that module). Reference: `reference.py`.
Design limits: targets equal to ignore_index give logp = entropy = 0 and no gradient; outputs are fp32.
"""

from typing import NamedTuple

import torch

from dash_kernels import backend as _backend
from dash_kernels._ext import on_tensor_device
from dash_kernels.ops import _chunked
from dash_kernels.ops._checks import check_linear, check_temperature
from dash_kernels.ops._triton_utils import (
    deterministic_mode,
    dot_precision,
    jit,
    num_programs_target,
    offsets_2d,
    tl,
    triton,
)
from dash_kernels.reference import IGNORE_INDEX, token_logprobs_ref

# Tile sizes per operand dtype, the largest that compile without register spills for both sm_80 and sm_90 (checked by
# `python -m dash_kernels.aot`). fp32 operands go through an IEEE fp32 dot (FMA, no tensor cores, unless torch allows
# TF32), whose operand fragments cost far more registers than a bf16 MMA, hence the smaller tiles.
FWD_CONFIGS = {
    "fp32": {"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
}
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


def _config(table, dtype):
    return table["fp32" if dtype == torch.float32 else "16bit"]


# ----------------------------------------------------------------------------------------------------- kernels
@jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, hdim,
                 stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """z[BLOCK_M, BLOCK_V] = (hidden[rows] @ weight[cols]^T + bias[cols]) * inv_temp, fp32; 0 where masked."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, hdim, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_mask = ks < hdim
        h = tl.load(hidden_ptr + offsets_2d(rows, stride_hn, ks, stride_hh),
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BH]
        w = tl.load(weight_ptr + offsets_2d(cols, stride_wv, ks, stride_wh),
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BV, BH]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BV]
        acc += b[None, :]
    return acc * inv_temp


@jit
def _token_logprobs_fwd_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, part_ptr,
                               n_rows, vocab, hdim, n_splits, tiles_per_split,
                               stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                               BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    sel = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] positions in the selected-row list
    sel_mask = sel < n_rows
    rows = tl.load(rows_ptr + sel, mask=sel_mask, other=0)  # [BM] int64 row ids
    y = tl.load(targets_ptr + rows, mask=sel_mask, other=-1)  # [BM]
    run_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    run_s = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - run_m)
    run_pz = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - run_m) * (z - run_m)
    z_y = tl.zeros([BLOCK_M], dtype=tl.float32)  # target logit (0 unless it lies in this split)
    v0 = pid_s * tiles_per_split * BLOCK_V
    for t in range(tiles_per_split):
        cols = v0 + t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, sel_mask, cols, col_mask, hdim,
                         stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION)
        # Padding columns (vocab not a multiple of the tile) must not enter the LSE: -inf, i.e. exp = 0.
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_m = tl.maximum(run_m, tl.max(z, 1))
        # new_m stays -inf while every column seen was padding; shift by 0 then, so no (-inf) - (-inf) = NaN.
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        scale = tl.exp(run_m - shift)
        e = tl.exp(z - shift[:, None])  # [BM, BV], 0 on padding
        zs = tl.where(col_mask[None, :], z - shift[:, None], 0.0)
        # Moving the reference point from run_m to shift: sum e'(z - shift) = scale * (pz + s * (run_m - shift)).
        moved = tl.where(run_s > 0, run_m - shift, 0.0)
        run_pz = scale * (run_pz + run_s * moved) + tl.sum(e * zs, 1)
        run_s = run_s * scale + tl.sum(e, 1)
        run_m = new_m
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    part = sel.to(tl.int64) * n_splits + pid_s
    plane = tl.cast(n_rows, tl.int64) * n_splits  # not n_rows.to(): n_rows == 1 arrives as a plain int (JIT constexpr)
    tl.store(part_ptr + part, run_m, mask=sel_mask)
    tl.store(part_ptr + plane + part, run_s, mask=sel_mask)
    tl.store(part_ptr + 2 * plane + part, run_pz, mask=sel_mask)
    tl.store(part_ptr + 3 * plane + part, z_y, mask=sel_mask)


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
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, sel_mask, cols, col_mask, hdim,
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


# --------------------------------------------------------------------------------------------------- launchers
def _all_rows(rows, n, device):
    return torch.arange(n, device=device, dtype=torch.int64) if rows is None else rows


@on_tensor_device
def token_logprobs_fwd(hidden, weight, bias, targets, rows, inv_temp, backend, want_entropy=True):
    """logp [n], norm [n, 2], entropy [n] (fp32) for the selected `rows` ([n] int64, or None for all) of
    hidden [N, H]. norm = (row max m, log sum exp(z - m)), so lse = m + log s; the backward wants them apart.
    The torch backend skips the entropy (returns zeros) unless want_entropy; Triton gets it for free."""
    if backend == "torch":
        logp, lse, entropy, *_ = _chunked.sweep(hidden, weight, bias, targets, rows, inv_temp,
                                                want_entropy=want_entropy)
        return logp, torch.stack([lse, torch.zeros_like(lse)], 1), entropy
    rows = _all_rows(rows, hidden.shape[0], hidden.device)
    n, V, H = rows.numel(), weight.shape[0], weight.shape[1]
    cfg = _config(FWD_CONFIGS, hidden.dtype)
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    tiles = triton.cdiv(V, cfg["BLOCK_V"])
    n_splits = max(1, min(tiles, num_programs_target(hidden.device) // max(row_blocks, 1)))
    tiles_per_split = triton.cdiv(tiles, n_splits)
    n_splits = triton.cdiv(tiles, tiles_per_split)
    part = torch.empty(4, n, n_splits, dtype=torch.float32, device=hidden.device)  # m, s, pz, z_y
    if n:
        _token_logprobs_fwd_kernel[(row_blocks, n_splits)](
            hidden, weight, bias if bias is not None else hidden, targets, rows, part,
            n, V, H, n_splits, tiles_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_temp,
            HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(hidden.dtype), **cfg)
    return _merge_splits(part)


def _merge_splits(part):
    """Combine per-split (max, sum exp, sum exp * (z - max), target logit) into logp, norm, entropy."""
    m, s, pz, z_y = part.unbind(0)  # each [n, n_splits]
    top = m.amax(1, keepdim=True)  # [n, 1]
    live = s > 0  # an empty split has m = -inf, s = 0: keep it out of every product
    w = torch.where(live, torch.exp(m - top), torch.zeros_like(m))
    total = (s * w).sum(1)  # [n]
    pz_top = (w * (pz + s * torch.where(live, m - top, torch.zeros_like(m)))).sum(1) / total  # sum p (z - top)
    log_total = total.log()
    logp = (z_y.sum(1) - top.squeeze(1)) - log_total
    return logp, torch.cat([top, log_total.unsqueeze(1)], 1), log_total - pz_top


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
    cfg = _config(DW_CONFIGS, dtype)
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
    rows = _all_rows(rows, hidden.shape[0], hidden.device)
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
    zc, hc, wc = (_config(t, hidden.dtype) for t in (BWD_CONFIGS, DH_CONFIGS, DW_CONFIGS))
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


# ----------------------------------------------------------------------------------------------------- autograd
class TokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64, rows [n] int64 | None -> logp, entropy [N]
    fp32 (0 on rows not selected; entropy only meaningful with want_entropy). Backward runs only on selected rows
    whose upstream gradient is non-zero."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, inv_temp, backend, want_entropy):
        logp, norm, entropy = token_logprobs_fwd(hidden, weight, bias, targets, rows, inv_temp, backend,
                                                 want_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, norm, entropy)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        ctx.set_materialize_grads(False)
        return _scatter_rows(logp, rows, hidden.shape[0]), _scatter_rows(entropy, rows, hidden.shape[0])

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, rows, norm, entropy = ctx.saved_tensors
        g, gh, rows, norm, entropy = _live_grads(grad_logp, grad_entropy, rows, norm, entropy, hidden.shape[0])
        dh, dw, db = token_logprobs_bwd(hidden, weight, bias, targets, rows, norm, entropy, g, gh, ctx.inv_temp,
                                        ctx.backend, *ctx.needs_input_grad[:3])
        return dh, _cast(dw, weight), _cast(db, bias), None, None, None, None, None


def _scatter_rows(values, rows, n):
    if rows is None:
        return values
    return values.new_zeros(n).index_copy_(0, rows, values)


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _live_grads(grad_logp, grad_entropy, rows, norm, entropy, n):
    """Keep only the selected rows whose upstream gradients are not both zero (the backward skips the rest)."""
    sel = torch.arange(n, device=entropy.device) if rows is None else rows  # [n_sel]
    g = grad_logp.to(entropy.dtype)[sel] if grad_logp is not None else torch.zeros_like(entropy)
    gh = grad_entropy.to(entropy.dtype)[sel] if grad_entropy is not None else None
    live = g != 0 if gh is None else (g != 0) | (gh != 0)
    if bool(live.all()):
        return g, gh, rows, norm, entropy
    idx = live.nonzero().squeeze(1)
    return g[idx], None if gh is None else gh[idx], sel[idx], norm[idx], entropy[idx]


# ------------------------------------------------------------------------------------------------------ public
def token_logprobs(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False,
                   ignore_index=IGNORE_INDEX):
    """Log-probabilities of `targets` under softmax((hidden @ weight.T + bias) / temperature), never forming the
    [N, V] logits; differentiable in hidden, weight and bias (and through the entropy, when returned).

    Args:
        hidden: [..., H] float (fp32, bf16, fp16). weight: [V, H], same dtype and device (tied embeddings: pass the
            embedding matrix). targets: [...] int, each in [0, V) or == ignore_index. bias: [V] or None.
        temperature: > 0; applied to the logits exactly as the sampler does (z / temperature).
    Returns:
        logp [...] fp32 (fp64 for fp64 inputs), and entropy [...] when return_entropy; both 0 where
        targets == ignore_index.
    Raises:
        ValueError naming the argument on shape, dtype, device or target-range errors.
    """
    check_linear(hidden, weight, targets, bias, ignore_index)
    inv_temp = 1.0 / check_temperature(temperature)
    backend = _backend.resolve(hidden.device)
    if backend == "reference":
        return token_logprobs_ref(hidden, weight, targets, temperature, bias, return_entropy, ignore_index)
    if backend == "triton" and hidden.dtype == torch.float64:
        backend = "torch"  # tl.dot has no fp64; fp64 is for gradcheck, where the torch path is the one under test
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    h2 = hidden.reshape(-1, H)  # [N, H]
    t1 = targets.reshape(-1).long()  # [N]
    valid = t1 != ignore_index
    rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # [n] int64, None = every row
    logp, entropy = TokenLogprobsFunction.apply(h2, weight, bias, t1, rows, inv_temp, backend, return_entropy)
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


# ------------------------------------------------------------------------------------------------------- AOT specs
def aot_specs():
    """The kernel variants the launchers above use, as (name, kernel, signature, constexprs, options) for the
    ahead-of-time compile check (`python -m dash_kernels.aot`)."""
    specs = []
    for label, dt, tt, prec in (("fp32", "fp32", torch.float32, "ieee"), ("fp32-tf32", "fp32", torch.float32, "tf32"),
                                ("bf16", "bf16", torch.bfloat16, "tf32")):
        common = {"hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "targets_ptr": "*i64",
                  "rows_ptr": "*i64"}
        strides = {"stride_hn": "i32", "stride_hh": "i32", "stride_wv": "i32", "stride_wh": "i32",
                   "inv_temp": "fp32"}
        fwd_full, bwd_full = _config(FWD_CONFIGS, tt), _config(BWD_CONFIGS, tt)
        fwd_cfg = {k: v for k, v in fwd_full.items() if k.startswith("BLOCK")}
        bwd_cfg = {k: v for k, v in bwd_full.items() if k.startswith("BLOCK")}
        fwd_sig = {**common, "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "hdim": "i32", "n_splits": "i32",
                   "tiles_per_split": "i32", **strides}
        for has_bias in (False, True):
            const = {"HAS_BIAS": has_bias, **fwd_cfg, "DOT_PRECISION": prec}
            specs.append((f"token_logprobs_fwd[{label}{',bias' if has_bias else ''}]", _token_logprobs_fwd_kernel,
                          {**fwd_sig, **{k: "constexpr" for k in const}}, const,
                          {"num_warps": fwd_full["num_warps"], "num_stages": fwd_full["num_stages"]}))
        bwd_sig = {**common, "norm_ptr": "*fp32", "neg_ent_ptr": "*fp32", "c_ptr": "*fp32", "ch_ptr": "*fp32",
                   "dz_ptr": f"*{dt}", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "dz_stride": "i32",
                   "hdim": "i32", **strides}
        for has_ent in (False, True):
            const = {"HAS_BIAS": False, "HAS_ENTROPY_GRAD": has_ent, **bwd_cfg, "DOT_PRECISION": prec}
            specs.append((f"token_logprobs_bwd[{label}{',entropy' if has_ent else ''}]", _token_logprobs_bwd_kernel,
                          {**bwd_sig, **{k: "constexpr" for k in const}}, const,
                          {"num_warps": bwd_full["num_warps"], "num_stages": bwd_full["num_stages"]}))
        dh_full = _config(DH_CONFIGS, tt)
        const = {**{k: v for k, v in dh_full.items() if k.startswith("BLOCK")}, "DOT_PRECISION": prec}
        dh_sig = {"dz_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "rows_ptr": "*i64", "acc_ptr": "*fp32",
                  "dh_ptr": f"*{dt}", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "dz_stride": "i32",
                  "hdim": "i32", "stride_wv": "i32", "stride_wh": "i32", "accumulate": "i32", "final": "i32"}
        specs.append((f"token_logprobs_bwd_dh[{label}]", _token_logprobs_dh_kernel,
                      {**dh_sig, **{k: "constexpr" for k in const}}, const,
                      {"num_warps": dh_full["num_warps"], "num_stages": dh_full["num_stages"]}))
        dw_full = _config(DW_CONFIGS, tt)
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
