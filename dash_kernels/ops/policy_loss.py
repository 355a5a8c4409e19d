"""fused_policy_loss: the advantage-filtered PPO/GRPO loss straight from hidden states, in three stages.

Every loss term reaches the logits only through two scalars per token (reference.py has the formulas):

    c_t  = dL/dlogp_t  = w_t * (dpg_t/dlogp_t + beta * dkl_t/dlogp_t)      dk3/dlogp = 1 - exp(ref_t - logp_t)
    cH_t = dL/dH_t     = -w_t * entropy_coef

where w_t = kept_t / denominator comes from `reference.loss_token_weights` (so the two paths cannot disagree on the
normaliser). Hence (1) the token_logprobs forward on the *active* rows only, (2) an O(N) kernel,
`_policy_coef_kernel`, that turns logp, old, ref, A, w into c_t, cH_t and the loss terms, and (3) the token_logprobs
backward with upstream gradients (c_t, cH_t) * dL.

Active rows are the kept tokens (masked in, past the advantage filter) whose loss term is not identically zero:
A != 0, or beta != 0, or entropy_coef != 0. Every other row costs nothing, not even its forward GEMM, since neither
the loss nor the reported metrics need its log-prob.

Torch backend: every denominator is known before the forward (it depends on the mask, never on logp), so c_t is
formed chunk by chunk as soon as the chunk's log-probs are known, and the gradient GEMMs run while the logits tile
is still in memory: 6NHV FLOPs, the same as the naive path, with no N x V buffer and no recompute. The gradient is
computed in the forward (when grad is enabled) and only scaled by dL in backward.
Triton backend: forward kernel, then `_policy_coef_kernel`, then the recomputing three-kernel backward of
token_logprobs (8NHV in all; deterministic under DASH_KERNELS_DETERMINISTIC=1, see token_logprobs_bwd).
"""

import torch

from dash_kernels import backend as _backend
from dash_kernels._ext import on_tensor_device
from dash_kernels.ops import _chunked
from dash_kernels.ops._checks import check_linear, check_same_device, check_shape, check_temperature, check_tensor
from dash_kernels.ops._triton_utils import jit, tl, triton
from dash_kernels.ops.token_logprobs import token_logprobs_fwd
from dash_kernels.ops.token_logprobs_bwd import token_logprobs_bwd
from dash_kernels.reference import (
    IGNORE_INDEX,
    LOSS_TYPES,
    _per_token_advantages,
    fused_policy_loss_ref,
    loss_token_weights,
)

COEF_BLOCK = 1024  # elements per program of the O(N) kernel: memory-bound, any large power of two will do
COEF_NUM_WARPS = 4
COEF_NUM_STAGES = 1  # no loop to pipeline; the launcher and `python -m dash_kernels.aot` both read these


# ------------------------------------------------------------------------------------------------------ kernel
@jit
def _policy_coef_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, ent_ptr,
                        loss_ptr, c_ptr, ch_ptr, clip_ptr, kl_ptr,
                        n, eps_low, eps_high, delta, beta, entropy_coef,
                        HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr,
                        KL_BIAS_CORRECTION: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if HAS_OLD:
        ratio = tl.exp(logp - tl.load(old_ptr + offs, mask=mask, other=0.0))
    else:
        ratio = tl.full([BLOCK], 1.0, dtype=tl.float32)  # on-policy: old = logp.detach()
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    r_clip = tl.minimum(tl.maximum(ratio, lo), hi)
    in_band = (ratio >= lo) & (ratio <= hi)  # where clamp passes the gradient through
    if HAS_DELTA:
        r_cap = tl.minimum(ratio, delta)
        cap_pass = ratio <= delta
    else:
        r_cap = ratio
        cap_pass = tl.full([BLOCK], 1, dtype=tl.int1)
    u1 = r_cap * adv
    u2 = r_clip * adv
    # d/dlogp of -min(u1, u2); d ratio/dlogp = ratio. A tie (inside the band) splits evenly, as torch.min does.
    du1 = tl.where(cap_pass, adv * ratio, 0.0)
    du2 = tl.where(in_band, adv * ratio, 0.0)
    dl = -tl.where(u1 < u2, du1, tl.where(u2 < u1, du2, 0.5 * (du1 + du2)))
    term = -tl.minimum(u1, u2)
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_KL:
        d = tl.load(ref_ptr + offs, mask=mask, other=0.0) - logp
        ed = tl.exp(d)
        kl = ed - d - 1.0  # k3
        dkl = 1.0 - ed
        if KL_BIAS_CORRECTION:  # kl * ratio, d/dlogp = ratio * (kl + dkl)
            dkl = ratio * (kl + dkl)
            kl = ratio * kl
        term += beta * kl
        dl += beta * dkl
    if HAS_ENTROPY:
        term -= entropy_coef * tl.load(ent_ptr + offs, mask=mask, other=0.0)
        tl.store(ch_ptr + offs, -w * entropy_coef, mask=mask)
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    tl.store(loss_ptr + offs, w * term, mask=mask)
    tl.store(c_ptr + offs, w * dl, mask=mask)
    tl.store(clip_ptr + offs, clipped.to(tl.float32), mask=mask)
    tl.store(kl_ptr + offs, kl, mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _policy_coef_torch(logp, old, ref, adv, w, entropy, eps_low, eps_high, delta, beta, entropy_coef,
                       kl_bias_correction=False):
    """Torch twin of _policy_coef_kernel (all [n] fp32): returns loss terms, c, cH (or None), clipped, kl."""
    ratio = torch.exp(logp - old) if old is not None else torch.ones_like(logp)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    r_clip = ratio.clamp(lo, hi)
    in_band = (ratio >= lo) & (ratio <= hi)
    r_cap, cap_pass = (ratio, torch.ones_like(in_band)) if delta is None else (ratio.clamp(max=delta), ratio <= delta)
    u1, u2 = r_cap * adv, r_clip * adv
    du1 = torch.where(cap_pass, adv * ratio, 0.0)
    du2 = torch.where(in_band, adv * ratio, 0.0)
    dl = -torch.where(u1 < u2, du1, torch.where(u2 < u1, du2, 0.5 * (du1 + du2)))
    term = -torch.minimum(u1, u2)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        d = ref - logp
        ed = torch.exp(d)
        kl = ed - d - 1.0
        dkl = 1.0 - ed
        if kl_bias_correction:
            kl, dkl = ratio * kl, ratio * (kl + dkl)
        term = term + beta * kl
        dl = dl + beta * dkl
    ch = None
    if entropy_coef != 0.0:
        if entropy is not None:  # None: the caller adds this term itself once the entropy is known
            term = term - entropy_coef * entropy
        ch = -w * entropy_coef
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    return w * term, w * dl, ch, clipped.to(logp.dtype), kl


@on_tensor_device
def policy_coef(logp, old, ref, adv, w, entropy, params, backend):
    """Stage 2 on the active rows ([n] fp32 each; old/ref may be None). params: (eps_low, eps_high, delta, beta,
    entropy_coef, kl_bias_correction). Returns (loss terms, c, cH or None, clipped as 0/1, kl), each [n] fp32."""
    eps_low, eps_high, delta, beta, entropy_coef, kl_bias_correction = params
    if backend == "torch":
        return _policy_coef_torch(logp, old, ref, adv, w, entropy, *params)
    n = logp.numel()
    out = torch.empty(5, n, dtype=torch.float32, device=logp.device)  # loss, c, cH, clipped, kl
    if n:
        _policy_coef_kernel[(triton.cdiv(n, COEF_BLOCK),)](
            logp, old if old is not None else logp, ref if ref is not None else logp, adv, w, entropy,
            out[0], out[1], out[2], out[3], out[4],
            n, float(eps_low), float(eps_high), float(delta if delta is not None else 0.0), float(beta),
            float(entropy_coef), HAS_OLD=old is not None, HAS_DELTA=delta is not None, HAS_KL=beta != 0.0,
            KL_BIAS_CORRECTION=bool(kl_bias_correction), HAS_ENTROPY=entropy_coef != 0.0, BLOCK=COEF_BLOCK,
            num_warps=COEF_NUM_WARPS, num_stages=COEF_NUM_STAGES)
    return out[0], out[1], (out[2] if entropy_coef != 0.0 else None), out[3], out[4]


# ------------------------------------------------------------------------------------------------------ autograd
class FusedPolicyLossFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64; rows [n] int64 (active rows); old, ref,
    adv, w: [n] fp32 (old/ref may be None) -> loss (0-dim fp32), and per-row logp, entropy, clipped, kl ([n],
    not differentiable, for the metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, old, ref, adv, w, inv_temp, params, backend, needs):
        ctx.backend, ctx.inv_temp = backend, inv_temp
        if backend == "torch":
            logp, entropy, terms, dh, dw, db = _torch_forward(hidden, weight, bias, targets, rows, old, ref, adv, w,
                                                              inv_temp, params, needs)
            ctx.grads = (dh, dw, db)
            # Kept (references only, no copies) so that a second backward through a retained graph can redo the sweep.
            ctx.save_for_backward(hidden, weight, bias, targets, rows, old, ref, adv, w)
            ctx.params, ctx.needs = params, needs
        else:
            logp, norm, entropy = token_logprobs_fwd(hidden, weight, bias, targets, rows, inv_temp, backend)
            terms = policy_coef(logp, old, ref, adv, w, entropy, params, backend)
            ctx.save_for_backward(hidden, weight, bias, targets, rows, norm, entropy, terms[1], terms[2])
        loss, _, _, clipped, kl = terms
        outs = (loss.sum(), logp, entropy, clipped, kl)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.backend == "torch":
            grads, ctx.grads = ctx.grads, None  # hand the buffers over (no copy when grad_loss == 1)
            if grads is None:  # backward again through a retained graph: the buffers now belong to the caller
                *_, dh, dw, db = _torch_forward(*ctx.saved_tensors, ctx.inv_temp, ctx.params, ctx.needs)
                grads = (dh, dw, db)
            dh, dw, db = (_scale(g, grad_loss) for g in grads)
        else:
            hidden, weight, bias, targets, rows, norm, entropy, c, ch = ctx.saved_tensors
            dh, dw, db = _triton_backward(hidden, weight, bias, targets, rows, norm, entropy, c, ch, grad_loss,
                                          ctx.inv_temp, ctx.backend, ctx.needs_input_grad[:3])
            dw = None if dw is None else dw.to(weight.dtype)
            db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, *([None] * 10)


def _torch_forward(hidden, weight, bias, targets, rows, old, ref, adv, w, inv_temp, params, needs):
    """Chunked sweep; with `needs` (dh, dw, db flags) set, the gradient is built during the same sweep."""
    n = rows.numel()
    acc = _chunked.acc_dtype(hidden.dtype)
    terms = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(5)]  # loss, c, cH, clip, kl

    def coef_fn(lo, hi, logp):
        part = lambda t: None if t is None else t[lo:hi]
        out = _policy_coef_torch(logp, part(old), part(ref), adv[lo:hi], w[lo:hi], None, *params)
        for buf, val in zip(terms, out):
            if val is not None:
                buf[lo:hi] = val
        return out[1], out[2]

    want_grad = any(needs)
    entropy_coef = params[4]
    logp, _, entropy, dh, dw, db = _chunked.sweep(hidden, weight, bias, targets, rows, inv_temp,
                                                  coef_fn=coef_fn if want_grad else None, want_entropy=True,
                                                  entropy_grad=entropy_coef != 0.0, need_dh=needs[0],
                                                  need_dw=needs[1], need_db=needs[2])
    if not want_grad:
        terms = list(_policy_coef_torch(logp, old, ref, adv, w, None, *params))
    if entropy_coef != 0.0:
        terms[0] = terms[0] - entropy_coef * w * entropy  # the entropy bonus, now that the entropy is known
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return logp, entropy, terms, dh, dw, db


def _triton_backward(hidden, weight, bias, targets, rows, norm, entropy, c, ch, grad_loss, inv_temp, backend, needs):
    g = c * grad_loss
    gh = None if ch is None else ch * grad_loss
    live = g != 0 if gh is None else (g != 0) | (gh != 0)  # rows whose gradient is exactly zero are skipped
    idx = live.nonzero().squeeze(1)
    if gh is not None:
        gh = gh[idx]
    return token_logprobs_bwd(hidden, weight, bias, targets, rows[idx], norm[idx], entropy[idx], g[idx], gh,
                              inv_temp, backend, *needs)


def _scale(grad, grad_loss):
    if grad is None:
        return None
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return grad  # the common case: no extra [V, H] multiply or buffer
    return grad * grad_loss.to(grad.dtype)


# ------------------------------------------------------------------------------------------------------ public
def fused_policy_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, *, loss_type="dapo",
                      eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, kl_bias_correction=False, entropy_coef=0.0,
                      adv_threshold=None, temperature=1.0, normalizer=None, max_completion_length=None, bias=None,
                      ignore_index=IGNORE_INDEX):
    """PPO-clip / GRPO-family loss from the policy's last hidden states, without the [B, L, V] logits.

    Same semantics as `reference.policy_loss` on `token_logprobs(hidden, weight, targets, temperature, bias)`; see
    reference.py for every formula and what each `loss_type` divides by.

    Args:
        hidden: [B, L, H] float, the hidden state that predicts targets[b, t]. weight: [V, H] (lm_head or tied
            embedding), same dtype/device. targets: [B, L] int (sampled tokens; ignore_index = masked).
        advantages: [B] or [B, L]. mask: [B, L] (nonzero = completion token that counts).
        old_logp: [B, L] log-probs at sampling time, or None (on-policy). ref_logp: [B, L], needed when beta != 0.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo". eps_low, eps_high: PPO clip range [1-eps_low, 1+eps_high].
        delta: optional upper cap on the unclipped ratio (two-sided clipping). beta: k3 KL weight.
        kl_bias_correction: multiply the k3 term by the (unclipped) ratio, as TRL's use_bias_correction_kl.
        entropy_coef: weight of the entropy bonus (loss -= entropy_coef * H). adv_threshold: tokens with
            |A| <= adv_threshold contribute nothing (None: no filter). temperature: logits / temperature.
        normalizer: the step's denominator (sequences for grpo, tokens for bnpo/dapo, sequences * max length for
            dr_grpo): pass the same value to every micro-batch so accumulation equals one big batch.
        max_completion_length: dr_grpo's length (default L). bias: [V] or None.
    Returns:
        (loss, metrics): loss is a 0-dim fp32 tensor, differentiable in hidden, weight, bias; metrics are detached
        0-dim tensors: "loss/clip_frac", "loss/kl", "loss/entropy", "loss/kept_frac", "loss/active_frac".
    """
    B, L = _check_loss_inputs(hidden, weight, targets, advantages, mask, old_logp, ref_logp, loss_type, beta,
                              normalizer, bias, ignore_index)
    inv_temp = 1.0 / check_temperature(temperature)
    loss_kwargs = {"loss_type": loss_type, "eps_low": eps_low, "eps_high": eps_high, "delta": delta, "beta": beta,
                   "kl_bias_correction": kl_bias_correction, "entropy_coef": entropy_coef,
                   "adv_threshold": adv_threshold, "normalizer": normalizer,
                   "max_completion_length": max_completion_length}
    backend = _backend.resolve(hidden.device)
    if backend == "reference":
        return fused_policy_loss_ref(hidden, weight, targets, advantages, mask, old_logp, ref_logp, bias=bias,
                                     temperature=temperature, ignore_index=ignore_index, **loss_kwargs)

    if backend == "triton" and hidden.dtype == torch.float64:
        backend = "torch"  # tl.dot has no fp64; fp64 is for gradcheck, where the torch path is the one under test
    acc = _chunked.acc_dtype(hidden.dtype)
    in_mask = (mask != 0) & (targets != ignore_index)  # [B, L]
    kept, w = loss_token_weights(in_mask, advantages, loss_type, adv_threshold, normalizer, max_completion_length,
                                 dtype=acc)
    adv = _per_token_advantages(advantages.detach().to(acc), in_mask.shape)  # [B, L]
    active = kept & ((adv != 0) | (beta != 0.0) | (entropy_coef != 0.0))
    rows = active.reshape(-1).nonzero().squeeze(1)  # [n] int64
    pick = lambda t: None if t is None else t.detach().reshape(-1).to(acc)[rows]
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = needs if torch.is_grad_enabled() else (False, False, False)
    loss, _logp, entropy, clipped, kl = FusedPolicyLossFunction.apply(
        hidden.reshape(B * L, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(), rows, pick(old_logp),
        pick(ref_logp) if beta != 0.0 else None, pick(adv), pick(w), inv_temp,
        (eps_low, eps_high, delta, beta, entropy_coef, kl_bias_correction), backend, needs)

    n_mask, n_kept, n_active = in_mask.sum(), kept.sum(), rows.numel()
    with torch.no_grad():
        metrics = {
            "loss/clip_frac": clipped.sum() / n_kept.clamp(min=1),
            "loss/kl": kl.sum() / n_kept.clamp(min=1),
            "loss/entropy": entropy.sum() / max(n_active, 1),
            "loss/kept_frac": n_kept.to(acc) / n_mask.clamp(min=1),
            "loss/active_frac": n_active / n_mask.clamp(min=1).to(acc),
        }
    return loss, metrics


def _check_loss_inputs(hidden, weight, targets, advantages, mask, old_logp, ref_logp, loss_type, beta, normalizer,
                       bias, ignore_index):
    check_tensor("hidden", hidden, ndim=3, floating=True)
    B, L = hidden.shape[:2]
    check_linear(hidden, weight, targets, bias, ignore_index)
    check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {L}), got shape {tuple(advantages.shape)}")
    check_tensor("mask", mask, ndim=2)
    check_shape("mask", mask, (B, L), "[B, L] of hidden")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            check_tensor(name, t, ndim=2, floating=True)
            check_shape(name, t, (B, L), "[B, L] of hidden")
    check_same_device(hidden=hidden, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp ([B, L] log-probs under the reference model)")
    if normalizer is not None and not isinstance(normalizer, torch.Tensor) and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    return B, L


# ------------------------------------------------------------------------------------------------------- AOT specs
def aot_specs():
    """(name, kernel, signature, constexprs, options) of the O(N) kernel for `python -m dash_kernels.aot`."""
    ptrs = ["logp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "w_ptr", "ent_ptr", "loss_ptr", "c_ptr", "ch_ptr", "clip_ptr",
            "kl_ptr"]
    sig = {**{p: "*fp32" for p in ptrs}, "n": "i32", "eps_low": "fp32", "eps_high": "fp32", "delta": "fp32",
           "beta": "fp32", "entropy_coef": "fp32"}
    const = {"HAS_OLD": True, "HAS_DELTA": True, "HAS_KL": True, "KL_BIAS_CORRECTION": True, "HAS_ENTROPY": True,
             "BLOCK": COEF_BLOCK}
    return [("policy_coef[all terms]", _policy_coef_kernel, {**sig, **{k: "constexpr" for k in const}}, const,
             {"num_warps": COEF_NUM_WARPS, "num_stages": COEF_NUM_STAGES})]
