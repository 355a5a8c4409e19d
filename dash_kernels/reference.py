"""Reference log-probs and policy-gradient loss: plain torch, the single source of truth.

Tests, benchmarks and both fused backends (Triton, chunked torch) are judged against these functions, and the fused
paths reuse `loss_token_weights` so the denominators can never drift apart. Everything here materialises the full
`[N, V]` logits: it is for checking and for tiny shapes, not for training at scale.

Loss semantics (mirror TRL's `GRPOTrainer._compute_loss`; `l_t` is the per-token loss below):

    r_t    = exp(logp_t - old_t)                                   (old = logp.detach() when not given: on-policy)
    pg_t   = -min(min(r_t, delta) * A_t, clamp(r_t, 1 - eps_low, 1 + eps_high) * A_t)   (delta only when given)
    kl_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (k3 estimator, only when beta != 0)
             times r_t with kl_bias_correction (TRL's use_bias_correction_kl: unbiased reverse-KL gradient)
    l_t    = pg_t + beta * kl_t - entropy_coef * H_t

    kept_t = mask_t and (|A_t| > adv_threshold)                    (no filter when adv_threshold is None)
    loss   = sum_t kept_t * l_t * w_t                              (w_t: the denominator of `loss_type`, below)

`loss_type` chooses the denominator. Filtered tokens are dropped from the numerator only: they still count in every
denominator, so with beta = 0 (where a filtered sample's A is ~0 anyway) filtering does not change the gradient.

    grpo     sum over sequences of [sum_t kept*l / max(1, sum_t mask)] / normalizer    default normalizer: B
             (TRL: per-sequence masked mean, then mean over sequences; length-biased)
    bnpo     sum_t kept*l / normalizer                          default normalizer: max(1, sum of mask) (this batch)
    dr_grpo  sum_t kept*l / normalizer                          default normalizer: B * max_completion_length
             (max_completion_length defaults to L)
    dapo     sum_t kept*l / normalizer                          default normalizer: max(1, sum of mask) (this batch)
             (TRL passes num_items_in_batch: the token count of the whole generation batch)

`normalizer` is the per-optimizer-step denominator. To make gradient accumulation over uneven, filtered micro-batches
give exactly the gradient of one big batch, pass the same value to every micro-batch of the step: the step's total
sequence count for grpo, its total (unfiltered) mask count for bnpo/dapo, total sequences * max length for dr_grpo.
TRL's extra division by the number of accumulation steps is then not needed.

Targets equal to `ignore_index` count as masked (excluded from numerator and denominators).
"""

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IGNORE_INDEX = -100


def token_logprobs_from_logits_ref(logits, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                                   dtype=torch.float32):
    """Per-token log-prob of `targets` under softmax(logits / temperature), computed in `dtype`.

    Args:
        logits: [..., V]. targets: [...] int, in [0, V) or ignore_index.
    Returns: logp [...] (and entropy [...] when return_entropy), both 0 where targets == ignore_index.
    """
    z = logits.to(dtype) / temperature  # [..., V]
    logsm = torch.log_softmax(z, dim=-1)  # [..., V]
    valid = targets != ignore_index  # [...]
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logsm.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [...]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logsm.exp()
    # p * log p with 0 * log 0 := 0, so vocab entries at -inf do not turn the entropy into NaN.
    plogp = torch.where(p > 0, p * logsm, torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False,
                       ignore_index=IGNORE_INDEX, dtype=torch.float32):
    """Reference for `token_logprobs`: logits = (hidden @ weight.T + bias) / temperature, materialised in `dtype`.

    Args:
        hidden: [..., H]. weight: [V, H]. targets: [...]. bias: [V] or None.
    """
    logits = hidden.to(dtype) @ weight.to(dtype).t()  # [..., V]
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs_from_logits_ref(logits, targets, temperature, return_entropy, ignore_index, dtype)


def _per_token_advantages(advantages, shape):
    """[B] (one per sequence) or [B, L] (per token) -> [B, L]."""
    return advantages.unsqueeze(-1).expand(shape) if advantages.dim() == 1 else advantages


def loss_token_weights(mask, advantages, loss_type="dapo", adv_threshold=None, normalizer=None,
                       max_completion_length=None, dtype=torch.float32):
    """Which tokens enter the loss and with what weight: the denominators of the module docstring, in one place.

    Args:
        mask: [B, L] bool or numeric (nonzero = completion token). advantages: [B] or [B, L].
    Returns:
        kept: [B, L] bool, tokens whose loss term counts (masked in, and past the advantage filter).
        weight: [B, L] `dtype`, kept / denominator (0 where not kept), so that loss = sum(weight * l).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    in_mask = mask != 0  # [B, L]
    B, L = in_mask.shape
    adv = _per_token_advantages(advantages, in_mask.shape)  # [B, L]
    kept = in_mask if adv_threshold is None else in_mask & (adv.abs() > adv_threshold)
    if normalizer is not None:
        normalizer = torch.as_tensor(normalizer, dtype=dtype, device=mask.device)
    if loss_type == "grpo":
        # Per-sequence mean over all its completion tokens (filtered ones included), then / number of sequences.
        seq_len = in_mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)  # [B, 1]
        n_seq = normalizer if normalizer is not None else torch.tensor(float(max(B, 1)), dtype=dtype)
        denom = seq_len * n_seq  # [B, 1]
    elif loss_type == "dr_grpo":
        max_len = L if max_completion_length is None else max_completion_length
        denom = normalizer if normalizer is not None else torch.tensor(float(max(B * max_len, 1)), dtype=dtype)
    else:  # bnpo, dapo: token mean; they differ only in which token count the trainer passes
        denom = normalizer if normalizer is not None else in_mask.sum().clamp(min=1).to(dtype)
    weight = kept.to(dtype) / denom  # [B, L]
    return kept, weight


def policy_loss(logp, old_logp, advantages, mask, ref_logp=None, entropy=None, *, loss_type="dapo", eps_low=0.2,
                eps_high=0.2, delta=None, beta=0.0, kl_bias_correction=False, entropy_coef=0.0, adv_threshold=None,
                normalizer=None, max_completion_length=None):
    """PPO-clip policy-gradient loss with optional k3 KL and entropy bonus (formulas in the module docstring).

    Differentiable in `logp` and `entropy`; old_logp, ref_logp and advantages are treated as data (detached).

    Args:
        logp: [B, L] log-probs of the sampled tokens under the current policy.
        old_logp: [B, L] or None (on-policy: ratio 1, gradient -A).
        advantages: [B] or [B, L]. mask: [B, L] (nonzero = completion token).
        ref_logp: [B, L], required when beta != 0. entropy: [B, L], required when entropy_coef != 0.
        normalizer: per-optimizer-step denominator (number or 0-dim tensor); see the module docstring.
    Returns:
        (loss, metrics): 0-dim loss in logp's dtype; metrics of detached 0-dim tensors, averaged over kept tokens:
        "loss/clip_frac" (PPO-clipped fraction, TRL's region rule), "loss/kl" (0 when beta == 0), "loss/entropy"
        (over active tokens, 0 when entropy is None), "loss/kept_frac" (kept / masked tokens), "loss/active_frac"
        (tokens whose loss term is not identically zero / masked tokens: the rows a fused path must compute).
    """
    if beta != 0.0 and ref_logp is None:
        raise ValueError("policy_loss: beta != 0 needs ref_logp")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef != 0 needs entropy")
    dtype = logp.dtype
    kept, weight = loss_token_weights(mask, advantages, loss_type, adv_threshold, normalizer, max_completion_length,
                                      dtype)
    adv = _per_token_advantages(advantages.detach().to(dtype), logp.shape)  # [B, L]
    zero = torch.zeros_like(logp)
    # Padding positions may hold garbage (inf, NaN): replace them before any arithmetic so that neither the loss nor
    # its gradient can pick up 0 * inf.
    lp = torch.where(kept, logp, zero)
    old = lp.detach() if old_logp is None else torch.where(kept, old_logp.detach().to(dtype), zero)
    adv = torch.where(kept, adv, zero)

    ratio = torch.exp(lp - old)  # [B, L]
    ratio_clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    ratio_capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(ratio_capped * adv, ratio_clipped * adv)  # [B, L]
    kl = zero
    if beta != 0.0:
        ref = torch.where(kept, ref_logp.detach().to(dtype), zero)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if kl_bias_correction:
            kl = kl * ratio  # the unclipped ratio, differentiable (TRL's use_bias_correction_kl)
        per_token = per_token + beta * kl
    if entropy_coef != 0.0:
        per_token = per_token - entropy_coef * torch.where(kept, entropy, zero)
    loss = (per_token * weight).sum()

    with torch.no_grad():
        n_mask = (mask != 0).sum()
        n_kept = kept.sum()
        active = kept & ((adv != 0) | (beta != 0.0) | (entropy_coef != 0.0))
        n_active = active.sum()
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        kept_f = kept.to(dtype)
        metrics = {
            "loss/clip_frac": (clipped & kept).sum().to(dtype) / n_kept.clamp(min=1),
            "loss/kl": (kl.detach() * kept_f).sum() / n_kept.clamp(min=1),
            "loss/entropy": (torch.where(active, entropy.detach().to(dtype), zero).sum() / n_active.clamp(min=1)
                             if entropy is not None else torch.zeros((), dtype=dtype)),
            "loss/kept_frac": n_kept.to(dtype) / n_mask.clamp(min=1),
            "loss/active_frac": n_active.to(dtype) / n_mask.clamp(min=1),
        }
    return loss, metrics


def fused_policy_loss_ref(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, *, bias=None,
                          temperature=1.0, ignore_index=IGNORE_INDEX, dtype=torch.float32, **loss_kwargs):
    """Reference for `fused_policy_loss`: materialised logits -> token_logprobs_ref -> policy_loss.

    Args:
        hidden: [B, L, H]. weight: [V, H]. targets, mask: [B, L]. advantages: [B] or [B, L].
        loss_kwargs: loss_type, eps_low, eps_high, delta, beta, kl_bias_correction, entropy_coef, adv_threshold,
            normalizer, max_completion_length (as in `policy_loss`).
    """
    logp, entropy = token_logprobs_ref(hidden, weight, targets, temperature, bias, True, ignore_index, dtype)
    mask = (mask != 0) & (targets != ignore_index)
    return policy_loss(logp, old_logp, advantages, mask, ref_logp, entropy, **loss_kwargs)
