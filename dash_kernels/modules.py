"""nn.Module wrappers around the functional ops, for trainers that configure losses as modules.

    loss_fn = FusedPolicyLoss(loss_type="dapo", beta=0.04, adv_threshold=0.1)
    loss, metrics = loss_fn(hidden, model.lm_head.weight, targets, advantages, mask, old_logp, ref_logp)

    head = LinearLogprobs(model.lm_head, temperature=0.9)   # log-probs without the [N, V] logits
    logp = head(hidden, targets)

The modules hold settings only (no parameters of their own), so they add nothing to a model's state dict.
"""

import torch
from torch import nn

from dash_kernels.ops.policy_loss import fused_policy_loss
from dash_kernels.ops.token_logprobs import token_logprobs
from dash_kernels.reference import IGNORE_INDEX


class FusedPolicyLoss(nn.Module):
    """`fused_policy_loss` with its settings fixed at construction; see that function for every argument."""

    def __init__(self, loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, entropy_coef=0.0,
                 adv_threshold=None, temperature=1.0, max_completion_length=None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.settings = {"loss_type": loss_type, "eps_low": eps_low, "eps_high": eps_high, "delta": delta, "beta": beta,
                             "entropy_coef": entropy_coef, "adv_threshold": adv_threshold, "temperature": temperature,
                             "max_completion_length": max_completion_length, "ignore_index": ignore_index}

    def forward(self, hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, bias=None,
                normalizer=None):
        """hidden [B, L, H], weight [V, H], targets/mask/old_logp/ref_logp [B, L], advantages [B] or [B, L]
        -> (loss, metrics). `normalizer` is per call: it is the optimizer step's denominator."""
        return fused_policy_loss(hidden, weight, targets, advantages, mask, old_logp, ref_logp, bias=bias,
                                 normalizer=normalizer, **self.settings)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


class LinearLogprobs(nn.Module):
    """Log-probs (and optionally the entropy) of targets under an existing lm_head, never forming the logits.

    Shares the head's weight (and bias): no copy, gradients flow to the head as with `head(hidden)`.
    """

    def __init__(self, head: nn.Linear, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head must be an nn.Linear (the lm_head), got {type(head).__name__}")  # noqa: TRY004
        self.head = head
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, return_entropy: bool = False):
        """hidden [..., H], targets [...] -> logp [...] fp32 (and entropy [...])."""
        return token_logprobs(hidden, self.head.weight, targets, self.temperature, self.head.bias, return_entropy,
                              self.ignore_index)

    def extra_repr(self):
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"
