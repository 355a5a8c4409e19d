"""The policy update's two halves: one micro-batch's loss and backward, and the optimizer step that follows them.

    update = PolicyUpdate(cfg, model, optimizer, scheduler, ref_model)
    for mb, normalizer in plan: update.backward(mb, normalizer, old_logp)   # fused loss, gradients accumulate
    update.step(dist_info)                                                 # join ranks, clip, step, schedule

The loss is `dash_kernels.fused_policy_loss` on the packed forward's hidden states at the completion positions (the
[B, Lc, V] logits are never materialised). A NaN / inf loss is never back-propagated: it is counted, and the whole
optimizer step is then skipped on every rank, so it cannot reach the weights. `frozen_copy` builds the KL reference
(beta > 0) as a frozen copy of the initial policy. The phases that call these are dash/rl/phases.py.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch

from dash.config import DashConfig
from dash.rl.distributed import DistInfo
from dash.rl.fsdp import full_value, is_sharded, zero_weight_backward
from dash.rl.optim import gradient_tensors
from dash.rl.parallel import Parallel
from dash_kernels import fused_policy_loss, token_logprobs


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The KL reference: a frozen copy of the initial policy (only built when beta > 0)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class PolicyUpdate:
    """Forward/backward of micro-batches through the fused loss, and the optimizer step."""

    def __init__(self, cfg: DashConfig, model, optimizer, scheduler, ref_model=None):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.ref_model = ref_model
        temp = cfg.sampling.temperature
        self.temperature = temp if temp > 0 else 1.0  # greedy sampling: score with the plain softmax
        self.non_finite = 0  # micro-batches of the current optimizer step whose loss was NaN / inf

    @staticmethod
    def completion_hidden(model, mb) -> torch.Tensor:
        """Packed forward of the micro-batch, gathered at the positions that predict its completion tokens."""
        hidden = model.forward_packed(mb.input_ids, mb.cu_seqlens, mb.positions, shared=mb.shared)  # [T, H]
        return hidden[mb.gather_index]  # [B, Lc, H]

    def token_logprobs(self, model, mb) -> torch.Tensor:
        """No-grad log-probs of the micro-batch's completion tokens under `model`: [B, Lc]."""
        with torch.no_grad():
            h = self.completion_hidden(model, mb)  # [B, Lc, H]
            targets = mb.targets.clamp(min=0)
            logp = token_logprobs(h.reshape(-1, h.shape[-1]), model.lm_head_weight, targets.reshape(-1),
                                  temperature=self.temperature)
            return logp.view_as(mb.old_logp) * mb.mask

    def backward(self, mb, normalizer: float | None, old_logp: torch.Tensor | None) -> dict:
        """Loss of one micro-batch, backward, and its metrics (detached floats). normalizer None: an FSDP padding
        micro-batch (dash/rl/fsdp.py), zero weight and no metrics."""
        if normalizer is None:
            zero_weight_backward(self.model, mb)
            return {}
        lc = self.cfg.loss
        ref_logp = self.token_logprobs(self.ref_model, mb) if lc.beta > 0 else None
        h = self.completion_hidden(self.model, mb)  # [B, Lc, H]
        loss, metrics = fused_policy_loss(
            h, self.model.lm_head_weight, mb.targets, mb.advantages, mb.mask, old_logp=old_logp, ref_logp=ref_logp,
            loss_type=lc.loss_type, eps_low=lc.eps_low, eps_high=lc.eps_high, beta=lc.beta,
            temperature=self.temperature, normalizer=normalizer, max_completion_length=self.cfg.sampling.max_new_tokens,
        )
        if torch.isfinite(loss):
            loss.backward()
        else:  # the whole optimizer step is skipped (see step()); no NaN reaches the gradients
            self.non_finite += 1
            if is_sharded(self.model):  # FSDP's per-layer collectives still need this rank's backward
                zero_weight_backward(self.model, mb)
        out = {k: float(v) for k, v in metrics.items()}
        out["loss/value"] = float(loss.detach())
        return out

    def step(self, info: DistInfo | None = None) -> dict:
        """Sync gradients over ranks, clip, step, zero, advance the LR schedule. A NaN/inf loss or gradient on any
        rank skips the update on every rank (and is reported); it never reaches the weights. `train/lr` is the rate
        this update used (or would have used, when skipped)."""
        t0 = time.perf_counter()
        average = self.cfg.loss.normalizer == "paper"  # paper: per-rank means, averaged like DDP
        self.non_finite = Parallel(self.model, info).sync_gradients(self.optimizer, self.non_finite, average)
        wait_s = time.perf_counter() - t0
        clip = self.cfg.train.grad_clip
        params = [p for p in gradient_tensors(self.optimizer, self.model) if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf) if params else torch.tensor(0.0)
        norm = full_value(norm)  # FSDP: a replicated DTensor
        skipped = bool(self.non_finite) or not torch.isfinite(norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped update still advances the schedule; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        out = {"train/grad_norm": float(norm), "train/skipped_update": float(skipped),
               "train/non_finite_losses": float(self.non_finite), "train/lr": lr, "time/grad_sync_s": wait_s}
        self.non_finite = 0
        return out
