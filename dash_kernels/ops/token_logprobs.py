"""token_logprobs: log p(y_t) (and the entropy) of a linear head's softmax, without ever holding the N x V logits.

    z = (h W^T + b) / tau          lse = logsumexp_j z_j          logp = z_y - lse          H = lse - sum_j p_j z_j

Forward (Triton): a 2-D grid of (row block) x (vocab split). Each program streams its split's vocab tiles through
the GEMM and keeps, per row, a running max m, sum of exp s, sum of exp * (z - m) and the target logit; the splits'
partials ([4, n, n_splits] fp32) are merged in torch. Splitting the vocab keeps a GPU busy when N is small; the merge
is deterministic (no locks), unlike a spin-locked global LSE.

Backward (Triton): token_logprobs_bwd.py, vocab chunk by vocab chunk over the rows whose upstream gradient is
non-zero (three kernels per chunk; its chunking and memory plan are `backward_plan` there). This module holds the
forward, the autograd Function that pairs the two, and the public function.

Torch backend: `_chunked.sweep`, the same algorithm in row chunks (see that module). Reference: `reference.py`.
Design limits: targets equal to ignore_index give logp = entropy = 0 and no gradient; outputs are fp32.
"""

import torch

from dash_kernels import backend as _backend
from dash_kernels._ext import on_tensor_device
from dash_kernels.ops import _chunked
from dash_kernels.ops._checks import check_linear, check_temperature
from dash_kernels.ops._triton_utils import (
    LOGITS_AOT_VARIANTS,
    all_rows,
    dot_precision,
    jit,
    logits_tile,
    logits_tile_signature,
    num_programs_target,
    pick_config,
    tl,
    triton,
)
from dash_kernels.ops.token_logprobs_bwd import token_logprobs_bwd
from dash_kernels.reference import IGNORE_INDEX, token_logprobs_ref

# Tile sizes per operand dtype, the largest that compile without register spills for both sm_80 and sm_90 (checked by
# `python -m dash_kernels.aot`). fp32 operands go through an IEEE fp32 dot (FMA, no tensor cores, unless torch allows
# TF32), whose operand fragments cost far more registers than a bf16 MMA, hence the smaller tiles.
FWD_CONFIGS = {
    "fp32": {"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
}


# ----------------------------------------------------------------------------------------------------- kernels
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
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, sel_mask, cols, col_mask, hdim,
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


# --------------------------------------------------------------------------------------------------- launchers
@on_tensor_device
def token_logprobs_fwd(hidden, weight, bias, targets, rows, inv_temp, backend, want_entropy=True):
    """logp [n], norm [n, 2], entropy [n] (fp32) for the selected `rows` ([n] int64, or None for all) of
    hidden [N, H]. norm = (row max m, log sum exp(z - m)), so lse = m + log s; the backward wants them apart.
    The torch backend skips the entropy (returns zeros) unless want_entropy; Triton gets it for free."""
    if backend == "torch":
        logp, lse, entropy, *_ = _chunked.sweep(hidden, weight, bias, targets, rows, inv_temp,
                                                want_entropy=want_entropy)
        return logp, torch.stack([lse, torch.zeros_like(lse)], 1), entropy
    rows = all_rows(rows, hidden.shape[0], hidden.device)
    n, V, H = rows.numel(), weight.shape[0], weight.shape[1]
    cfg = pick_config(FWD_CONFIGS, hidden.dtype)
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
    """The forward kernel variants the launcher above uses, as (name, kernel, signature, constexprs, options) for
    the ahead-of-time compile check (`python -m dash_kernels.aot`); the backward's are token_logprobs_bwd.aot_specs."""
    specs = []
    for label, dt, tt, prec in LOGITS_AOT_VARIANTS:
        common, strides = logits_tile_signature(dt)
        fwd_full = pick_config(FWD_CONFIGS, tt)
        fwd_cfg = {k: v for k, v in fwd_full.items() if k.startswith("BLOCK")}
        fwd_sig = {**common, "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "hdim": "i32", "n_splits": "i32",
                   "tiles_per_split": "i32", **strides}
        for has_bias in (False, True):
            const = {"HAS_BIAS": has_bias, **fwd_cfg, "DOT_PRECISION": prec}
            specs.append((f"token_logprobs_fwd[{label}{',bias' if has_bias else ''}]", _token_logprobs_fwd_kernel,
                          {**fwd_sig, **{k: "constexpr" for k in const}}, const,
                          {"num_warps": fwd_full["num_warps"], "num_stages": fwd_full["num_stages"]}))
    return specs
