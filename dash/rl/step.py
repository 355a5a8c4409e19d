"""One optimizer step of the RL loop: GRPO baseline and DASH on one process and one copy of the weights.

    for step in range(steps):
        examples = data.next_batch(prompts_per_step)
        rollout  = sample(examples)            # dash: ONE call for the step; grpo: one call per micro-batch
        adv      = group_advantages(rollout.rewards)
        keep     = |adv| > adv_threshold       # dash only: filtering happens before any training forward
        for mb in plan(keep): loss(mb).backward()
        clip ; optimizer.step() ; log ; eval / checkpoint on schedule

Departures from the paper's code, all deliberate:
  * The GRPO baseline makes its 32 small sampling calls first and then trains on the same micro-batches (the paper
    interleaves them); on one device the time is the same sum, and the loss normaliser of the whole step is known.
  * A micro-batch whose samples are all filtered is skipped instead of keeping its row 0 (which only adds a KL term):
    a filtered sample contributes nothing, as the paper's text says.
  * Both algorithms draw exactly the same completions for a step (per-prompt seeds; see dash/rl/sample.py).
The loop around it (data, eval, checkpoints, logging) is dash/rl/trainer.py.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch

from dash.config import DashConfig
from dash.rl.distributed import DistInfo, all_reduce_grads, all_reduce_sum, shard_range
from dash.rl.fsdp import full_value, gathered, is_sharded, pad_plans, reshard_all, zero_weight_backward
from dash.rl.loss_norm import global_normalizer, paper_normalizer
from dash.rl.optim import gradient_tensors, make_adamw
from dash.rl.packing import collate, plan_balanced, plan_fixed
from dash.rl.rollout import Rollout, group_advantages, keep_mask, zero_non_finite


class StepMicroBatches:
    """The micro-batch plan of one step and the normaliser each micro-batch uses."""

    def __init__(self, cfg: DashConfig, rollout: Rollout, keep: torch.Tensor, counts: tuple[float, float]):
        """counts: (samples, completion tokens) of the whole update, over all ranks: the global normaliser's input."""
        t, loss = cfg.train, cfg.loss
        if loss.normalizer == "paper" or t.algorithm == "grpo":
            self.plan = plan_fixed(len(rollout), t.micro_batch_size, keep)  # the paper's micro-batches
        else:
            lengths = [len(p) + len(c) - 1 for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
            rows = len(rollout) if t.token_budget > 0 else t.micro_batch_size
            self.plan = plan_balanced(lengths, keep, rows, t.token_budget)
        max_new = cfg.sampling.max_new_tokens
        if loss.normalizer == "global":
            step_norm = global_normalizer(loss.loss_type, int(counts[0]), int(counts[1]), max_new)
            self.norms = [step_norm] * len(self.plan)
        else:
            self.norms = [paper_normalizer(loss.loss_type, len(mb), sum(len(rollout.completion_ids[i]) for i in mb),
                                           max_new, len(rollout), t.micro_batch_size) for mb in self.plan]


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
        from dash_kernels import token_logprobs

        with torch.no_grad():
            h = self.completion_hidden(model, mb)  # [B, Lc, H]
            targets = mb.targets.clamp(min=0)
            logp = token_logprobs(h.reshape(-1, h.shape[-1]), model.lm_head_weight, targets.reshape(-1),
                                  temperature=self.temperature)
            return logp.view_as(mb.old_logp) * mb.mask

    def backward(self, mb, normalizer: float | None, old_logp: torch.Tensor | None) -> dict:
        """Loss of one micro-batch, backward, and its metrics (detached floats). normalizer None: an FSDP padding
        micro-batch (dash/rl/fsdp.py), zero weight and no metrics."""
        from dash_kernels import fused_policy_loss

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
        """Sync gradients over ranks, clip, step, zero. A NaN/inf loss or gradient on any rank skips the update on
        every rank (and is reported); it never reaches the weights."""
        info = info or DistInfo()
        t0 = time.perf_counter()
        if is_sharded(self.model):  # FSDP already reduce-scattered the gradients during backward
            reshard_all(self.model)
            self.non_finite = int(all_reduce_sum([float(self.non_finite)], info)[0])
        elif info.enabled:
            average = self.cfg.loss.normalizer == "paper"  # paper: per-rank means, averaged like DDP
            self.non_finite = int(all_reduce_grads(gradient_tensors(self.optimizer, self.model), info,
                                                   [float(self.non_finite)], average)[0])
        wait_s = time.perf_counter() - t0
        clip = self.cfg.train.grad_clip
        params = [p for p in gradient_tensors(self.optimizer, self.model) if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf) if params else torch.tensor(0.0)
        norm = full_value(norm)  # FSDP: a replicated DTensor
        skipped = bool(self.non_finite) or not torch.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped update still advances the schedule; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        out = {"train/grad_norm": float(norm), "train/skipped_update": float(skipped),
               "train/non_finite_losses": float(self.non_finite), "train/lr": self.scheduler.get_last_lr()[0],
               "time/grad_sync_s": wait_s}
        self.non_finite = 0
        return out


def build_optimizer(cfg: DashConfig, model):
    t = cfg.train
    opt = make_adamw(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)  # fp32 masters for 16-bit models
    total = t.steps * t.ppo_epochs * t.ppo_minibatches
    if t.lr_schedule == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return opt, sched


def frozen_copy(model):
    """The KL reference: a frozen copy of the initial policy (only built when beta > 0)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def run_step(cfg: DashConfig, sampler, update: PolicyUpdate, examples: list, step: int,
             dist_info: DistInfo | None = None) -> tuple[dict, Rollout]:
    """One optimizer step (or ppo_epochs x ppo_minibatches of them) of `cfg.train.algorithm`; returns metrics.

    `examples` is the whole step's prompt batch (the same list on every rank); under torchrun each rank samples and
    trains on its contiguous share, and prompt k keeps its single-process seed.
    """
    t = cfg.train
    G = t.group_size
    info = dist_info or DistInfo()
    lo, hi = shard_range(len(examples), info)
    t0 = time.perf_counter()
    reward_s0 = sampler.reward_seconds
    with gathered(update.model):  # FSDP: one all-gather for the whole generation phase
        if t.algorithm == "dash":
            rollout = sampler.sample(examples[lo:hi], G, t.seed, step, lo)
            calls = 1
        else:  # grpo: one sampling call per backprop micro-batch of micro_batch_size completions
            per_call = t.micro_batch_size // G
            parts = [sampler.sample(examples[i:min(i + per_call, hi)], G, t.seed, step, i)
                     for i in range(lo, hi, per_call)]
            rollout, calls = Rollout.concat(parts), len(parts)
    t_reward = sampler.reward_seconds - reward_s0
    t_gen = time.perf_counter() - t0 - t_reward

    adv, non_finite_adv = zero_non_finite(group_advantages(rollout.rewards, G))  # [S]
    if non_finite_adv:
        warnings.warn(f"step {step}: {non_finite_adv} non-finite advantages (a reward beyond fp32's range) set to 0; "
                      "those samples carry no policy gradient (counted in rollout/non_finite_adv)")
    filtering = t.algorithm == "dash" and cfg.loss.gradient_filtering
    keep = keep_mask(adv, cfg.loss.adv_threshold if filtering else None)  # [S]
    keep &= torch.tensor([len(c) > 0 for c in rollout.completion_ids])  # nothing to train on an empty completion
    device = next(update.model.parameters()).device
    t1 = time.perf_counter()
    metrics_sum: dict[str, float] = {}
    update_metrics: dict = {}
    n_mb = 0
    # PPO-Mini: every K-th sample; a mini-batch may split a group, which is fine because the advantages above were
    # computed on whole groups before the split.
    minibatches = [list(range(len(rollout)))[i::t.ppo_minibatches] for i in range(t.ppo_minibatches)]
    local_counts = [x for mini in minibatches for x in (len(mini), sum(len(rollout.completion_ids[i]) for i in mini))]
    # One collective for all counts: [samples, tokens] per mini-batch, then reward sum and kept samples of the step.
    # Under torchrun it is also where a rank that generated faster waits for the slowest one (time/count_sync_s).
    counts = all_reduce_sum(local_counts + [float(rollout.rewards.sum()), float(keep.sum())], info)
    count_sync_s = time.perf_counter() - t1
    reward_sum, kept_all = counts[-2], counts[-1]
    plans = []  # per mini-batch: [(micro-batch, normaliser), ...]
    for j, mini in enumerate(minibatches):
        mini_keep = torch.zeros_like(keep)
        mini_keep[mini] = keep[mini]
        sub = StepMicroBatches(cfg, rollout, mini_keep, (counts[2 * j], counts[2 * j + 1]))
        plans.append([(collate(rollout, idx, adv, device, cfg.train.share_prompts), norm)
                      for idx, norm in zip(sub.plan, sub.norms)])
    pads = 0
    if is_sharded(update.model):  # FSDP's collectives are per micro-batch: every rank runs the same count
        plans, pads = pad_plans(plans, info, device)
    olds = _old_logps(cfg, update, plans, reuse=t.ppo_epochs * t.ppo_minibatches > 1)
    train_tokens = 0  # packed rows forwarded and back-propagated (shared prompt rows count once)
    for epoch in range(t.ppo_epochs):
        for plan, plan_olds in zip(plans, olds):
            for (mb, norm), old in zip(plan, plan_olds):
                for k, v in update.backward(mb, norm, old).items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v
                n_mb += int(norm is not None)
                train_tokens += mb.num_tokens if norm is not None else 0
            update_metrics = update.step(info)
    t_train = time.perf_counter() - t1
    S, kept = len(rollout), int(keep.sum())
    S_all = sum(counts[0:-2:2])  # samples over all ranks: every sample is in exactly one mini-batch
    metrics = {k: v / max(n_mb, 1) for k, v in metrics_sum.items()}
    metrics.update(update_metrics)
    metrics.update({
        "rollout/reward_mean": reward_sum / S_all, "rollout/kept_frac": kept_all / S_all,
        "rollout/rank_kept_frac": kept / S,
        "rollout/completion_len": rollout.completion_tokens() / S, "rollout/sampling_calls": calls,
        "train/micro_batches": n_mb, "train/tokens": train_tokens, "train/pad_micro_batches": pads * t.ppo_epochs,
        "train/skipped_samples": S - kept, "rollout/non_finite_adv": non_finite_adv,
        "time/generate_s": t_gen, "time/reward_s": t_reward, "time/train_s": t_train, "time/count_sync_s": count_sync_s,
        "time/gen_tok_s": rollout.completion_tokens() / max(t_gen, 1e-9),
        "reward/failed_calls": sampler.reward_stats.failures,
        "reward/no_reward": sampler.reward_stats.no_reward,  # None from a TRL-form reward: scored 0, not a failure
    })
    return metrics, rollout


def _old_logps(cfg: DashConfig, update: PolicyUpdate, plans: list, reuse: bool) -> list[list]:
    """The ratio's denominators of every micro-batch (see TrainConfig.old_logp), all taken before the step's first
    update touches the weights, so a later PPO epoch or mini-batch compares against the policy that sampled."""
    if cfg.train.old_logp == "sampler":
        return [[mb.old_logp for mb, _ in plan] for plan in plans]
    if not reuse:  # one update per sample: on-policy, ratio exactly 1 (the paper's logp.detach())
        return [[None for _ in plan] for plan in plans]
    return [[update.token_logprobs(update.model, mb) for mb, _ in plan] for plan in plans]
