"""token_logprobs_from_logits: per-token log-probs (and entropy) for trainers that already hold the logits.

    z = logits / tau,  lse = logsumexp(z),  logp = z[y] - lse,  H = lse - sum p z

The naive `log_softmax(logits).gather(...)` keeps a second N x V buffer (the log-softmax output) alive for backward;
here the forward saves only the logits (which autograd holds anyway) plus, per row, the max m, log sum exp(z - m) and
the entropy ([N] fp32 each; m and log s are kept apart so that log p = (z - m) - log s stays exact for the top logits,
which z - lse would not, lse ~ 15 having an ulp of ~1e-6), and the backward
writes the gradient tile by tile straight into grad_logits, in the logits' dtype. Rows whose upstream gradient is
zero (and ignore_index rows) are left at zero without being read. Upcasting to fp32 happens per tile, so bf16 logits
never turn into an fp32 copy.

Triton: forward is one program per selected row, looping over vocab tiles with an online max / sum / sum p z;
backward is a (row) x (vocab tile) grid. The torch backend does the same per row group.
"""

import torch

from dash_kernels import backend as _backend
from dash_kernels._ext import on_tensor_device
from dash_kernels.ops._checks import check_shape, check_targets, check_temperature, check_tensor
from dash_kernels.ops._triton_utils import jit, tl, triton
from dash_kernels.reference import IGNORE_INDEX, token_logprobs_from_logits_ref

BLOCK_V = 1024  # vocab tile per step; row-wise online softmax, memory-bound
NUM_WARPS = 4
NUM_STAGES = 3  # Triton's default, what the launchers always ran; they and `python -m dash_kernels.aot` read it
_GROUP_BYTES = 16 * 2**20  # torch backend: fp32 working set per row group


# ------------------------------------------------------------------------------------------------------ kernels
@jit
def _logprobs_from_logits_fwd_kernel(logits_ptr, targets_ptr, rows_ptr, norm_ptr, logp_ptr, ent_ptr,
                                     vocab, stride_n, inv_temp, BLOCK_V: tl.constexpr):
    sel = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + sel)
    y = tl.load(targets_ptr + row)
    base = logits_ptr + row * stride_n  # int64: N * V passes 2**31 for real batches
    run_m = float("-inf")
    run_s = 0.0
    run_pz = 0.0  # sum exp(z - run_m) * (z - run_m)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab
        z = tl.load(base + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_temp
        new_m = tl.maximum(run_m, tl.max(z, 0))
        scale = tl.exp(run_m - new_m)
        zs = tl.where(col_mask, z - new_m, 0.0)
        e = tl.where(col_mask, tl.exp(zs), 0.0)
        moved = tl.where(run_s > 0, run_m - new_m, 0.0)
        run_pz = scale * (run_pz + run_s * moved) + tl.sum(e * zs, 0)
        run_s = run_s * scale + tl.sum(e, 0)
        run_m = new_m
    z_y = tl.load(base + y).to(tl.float32) * inv_temp
    log_s = tl.log(run_s)
    tl.store(norm_ptr + 2 * sel, run_m)
    tl.store(norm_ptr + 2 * sel + 1, log_s)
    tl.store(logp_ptr + sel, (z_y - run_m) - log_s)
    tl.store(ent_ptr + sel, log_s - run_pz / run_s)


@jit
def _logprobs_from_logits_bwd_kernel(logits_ptr, grad_ptr, targets_ptr, rows_ptr, norm_ptr, ent_ptr, c_ptr, ch_ptr,
                                     vocab, stride_n, stride_gn, inv_temp,
                                     HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    sel = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab
    row = tl.load(rows_ptr + sel)
    y = tl.load(targets_ptr + row)
    row_max = tl.load(norm_ptr + 2 * sel)
    log_s = tl.load(norm_ptr + 2 * sel + 1)
    c = tl.load(c_ptr + sel)  # dL/dlogp / tau
    z = tl.load(logits_ptr + row * stride_n + cols, mask=col_mask, other=0.0).to(tl.float32) * inv_temp
    log_p = (z - row_max) - log_s
    p = tl.where(col_mask, tl.exp(log_p), 0.0)
    dz = tl.where(cols == y, c, 0.0) - c * p
    if HAS_ENTROPY_GRAD:
        # dH/dz = -p (z - sum p z) = -p (log_p + H)
        dz -= tl.load(ch_ptr + sel) * p * (log_p + tl.load(ent_ptr + sel))
    tl.store(grad_ptr + row * stride_gn + cols, dz.to(grad_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------------- launchers
@on_tensor_device
def logprobs_from_logits_fwd(logits, targets, rows, inv_temp, backend):
    """norm [n, 2] (row max, log sum exp(z - max)), logp [n], entropy [n] (fp32) of the selected rows ([n] int64)
    of logits [N, V]."""
    n, V = rows.numel(), logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    norm = torch.empty(n, 2, dtype=acc, device=logits.device)
    out = torch.empty(2, n, dtype=acc, device=logits.device)  # logp, entropy
    if n == 0:
        return norm, out[0], out[1]
    if backend == "torch":
        G = max(1, _GROUP_BYTES // (4 * V))
        for lo in range(0, n, G):
            r = rows[lo:lo + G]
            z = logits.index_select(0, r).to(acc).mul_(inv_temp)  # [g, V]
            m = z.amax(1, keepdim=True)
            z_y = z.gather(1, targets.index_select(0, r).unsqueeze(1)).squeeze(1)
            z.sub_(m)
            e = torch.exp(z)
            s = e.sum(1)
            log_s = s.log()
            norm[lo:lo + G, 0] = m.squeeze(1)
            norm[lo:lo + G, 1] = log_s
            out[0, lo:lo + G] = (z_y - m.squeeze(1)) - log_s  # z was shifted in place, z_y was not
            out[1, lo:lo + G] = log_s - e.mul_(z).sum(1) / s
        return norm, out[0], out[1]
    _logprobs_from_logits_fwd_kernel[(n,)](logits, targets, rows, norm, out[0], out[1], V, logits.stride(0),
                                           inv_temp, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                                           num_stages=NUM_STAGES)
    return norm, out[0], out[1]


@on_tensor_device
def logprobs_from_logits_bwd(logits, targets, rows, norm, entropy, c, ch, inv_temp, backend):
    """grad_logits [N, V] in logits' dtype from per-row c = dL/dlogp and ch = dL/dH ([n]; ch may be None)."""
    grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
    n, V = rows.numel(), logits.shape[1]
    if n == 0:
        return grad
    c = c.to(norm.dtype) * inv_temp
    ch = None if ch is None else ch.to(norm.dtype) * inv_temp
    if backend == "torch":
        G = max(1, _GROUP_BYTES // (4 * V))
        for lo in range(0, n, G):
            r = rows[lo:lo + G]
            cg = c[lo:lo + G].unsqueeze(1)  # [g, 1]
            nrm = norm[lo:lo + G]
            log_p = logits.index_select(0, r).to(norm.dtype).mul_(inv_temp).sub_(nrm[:, :1]).sub_(nrm[:, 1:])  # [g, V]
            p = torch.exp(log_p)
            if ch is None:
                dz = p.mul_(-cg)
            else:
                dz = log_p.add_(entropy[lo:lo + G].unsqueeze(1)).mul_(ch[lo:lo + G].unsqueeze(1)).add_(cg)
                dz.mul_(p).neg_()
            dz.scatter_add_(1, targets.index_select(0, r).unsqueeze(1), cg)
            grad.index_copy_(0, r, dz.to(grad.dtype))
        return grad
    _logprobs_from_logits_bwd_kernel[(n, triton.cdiv(V, BLOCK_V))](
        logits, grad, targets, rows, norm.contiguous(), entropy, c, ch if ch is not None else c, V, logits.stride(0),
        grad.stride(0), inv_temp, HAS_ENTROPY_GRAD=ch is not None, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    return grad


# ----------------------------------------------------------------------------------------------------- autograd
class LogprobsFromLogitsFunction(torch.autograd.Function):
    """logits [N, V] (unit stride along V), targets [N] int64, rows [n] int64 -> logp, entropy [N] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, rows, inv_temp, backend):
        norm, logp, entropy = logprobs_from_logits_fwd(logits, targets, rows, inv_temp, backend)
        ctx.save_for_backward(logits, targets, rows, norm, entropy)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        ctx.set_materialize_grads(False)
        N = logits.shape[0]
        return logp.new_zeros(N).index_copy_(0, rows, logp), logp.new_zeros(N).index_copy_(0, rows, entropy)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, rows, norm, entropy = ctx.saved_tensors
        c = grad_logp[rows] if grad_logp is not None else torch.zeros_like(entropy)
        ch = None if grad_entropy is None else grad_entropy[rows]
        live = (c != 0) if ch is None else (c != 0) | (ch != 0)
        idx = live.nonzero().squeeze(1)
        grad = logprobs_from_logits_bwd(logits, targets, rows[idx], norm[idx], entropy[idx], c[idx],
                                        None if ch is None else ch[idx], ctx.inv_temp, ctx.backend)
        return grad, None, None, None, None


# ------------------------------------------------------------------------------------------------------- public
def token_logprobs_from_logits(logits, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX):
    """Log-probabilities of `targets` under softmax(logits / temperature), with a backward that keeps no second
    [N, V] buffer.

    Args:
        logits: [..., V] float (any float dtype; math in fp32). targets: [...] int in [0, V) or ignore_index.
        temperature: > 0.
    Returns:
        logp [...] fp32 (and entropy [...] fp32 when return_entropy); 0 where targets == ignore_index.
    """
    check_tensor("logits", logits, floating=True)
    check_tensor("targets", targets, integer=True)
    if logits.dim() < 1:
        raise ValueError(f"logits must be [..., V], got shape {tuple(logits.shape)}")
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    check_targets(targets, logits.shape[-1], ignore_index)
    inv_temp = 1.0 / check_temperature(temperature)
    backend = _backend.resolve(logits.device)
    if backend == "reference":
        return token_logprobs_from_logits_ref(logits, targets, temperature, return_entropy, ignore_index)
    if backend == "triton" and logits.dtype == torch.float64:
        backend = "torch"  # fp64 is for gradcheck, where the torch path is the one under test
    lead, V = logits.shape[:-1], logits.shape[-1]
    z = logits.reshape(-1, V)
    if z.stride(1) != 1:
        z = z.contiguous()
    t1 = targets.reshape(-1).long()
    rows = (t1 != ignore_index).nonzero().squeeze(1)  # [n]
    logp, entropy = LogprobsFromLogitsFunction.apply(z, t1, rows, inv_temp, backend)
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


# ------------------------------------------------------------------------------------------------------- AOT specs
def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`."""
    specs = []
    for dt in ("fp32", "bf16"):
        fwd_sig = {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "rows_ptr": "*i64", "norm_ptr": "*fp32",
                   "logp_ptr": "*fp32", "ent_ptr": "*fp32", "vocab": "i32", "stride_n": "i32", "inv_temp": "fp32",
                   "BLOCK_V": "constexpr"}
        specs.append((f"from_logits_fwd[{dt}]", _logprobs_from_logits_fwd_kernel, fwd_sig, {"BLOCK_V": BLOCK_V},
                      {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
        bwd_sig = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "targets_ptr": "*i64", "rows_ptr": "*i64",
                   "norm_ptr": "*fp32", "ent_ptr": "*fp32", "c_ptr": "*fp32", "ch_ptr": "*fp32", "vocab": "i32",
                   "stride_n": "i32", "stride_gn": "i32", "inv_temp": "fp32", "HAS_ENTROPY_GRAD": "constexpr",
                   "BLOCK_V": "constexpr"}
        specs.append((f"from_logits_bwd[{dt}]", _logprobs_from_logits_bwd_kernel, bwd_sig,
                      {"HAS_ENTROPY_GRAD": True, "BLOCK_V": BLOCK_V},
                      {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs
