"""The phases of one RL optimizer step, in the paper's order; dash/rl/step.py calls them one after the other.

    collect_rollouts    DASH: preemptive sampling, ONE call for the whole step; GRPO: one call per micro-batch
    gradient_filter     group advantages, then the selection rule's keep mask (default DASH's |A| > adv_threshold)
    count_step          the step's counts over all ranks, in one collective (the global normaliser's inputs)
    plan_micro_batches  pack the kept samples into micro-batches, each with its loss normaliser
    update_policy       ppo_epochs x ppo_minibatches optimizer steps over those micro-batches

Each phase returns plain values (NamedTuples, lists), so a test can run any one of them alone. What
the paper's code does differently, and why, is in dash/rl/step.py's docstring; the parallel strategy every phase
defers to is dash/rl/parallel.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dash.config import DashConfig
from dash.rl.distributed import DistInfo
from dash.rl.loss_norm import global_normalizer, paper_normalizer
from dash.rl.packing import collate, plan_balanced, plan_fixed
from dash.rl.parallel import Parallel
from dash.rl.rollout import Rollout, group_advantages, zero_non_finite
from dash.rl.selection import select_samples


class Collected(NamedTuple):
    """The step's samples on this rank and how many sampling calls produced them."""
    rollout: Rollout
    calls: int


def collect_rollouts(cfg: DashConfig, sampler, examples: list, step: int, share: tuple[int, int]) -> Collected:
    """Samples G completions for each of this rank's prompts `examples[lo:hi]`, scored by the reward.

    DASH: preemptive sampling (the paper's term), ONE sampling call for the whole step, made before any training
    forward. GRPO: one call per backprop micro-batch (micro_batch_size // G prompts each), as the paper's baseline.
    Prompt k is seeded by k in both, so the two algorithms draw exactly the same completions
    (dash/rl/rollout_sampler.py).
    """
    t = cfg.train
    lo, hi = share
    if t.algorithm == "dash":
        # Preemptive sampling: every completion of the step in this one call, so the engine batches all of this
        # rank's prompts x G samples together instead of micro_batch_size at a time.
        return Collected(sampler.sample(examples[lo:hi], t.group_size, t.seed, step, lo), 1)
    per_call = t.micro_batch_size // t.group_size
    parts = [sampler.sample(examples[i:min(i + per_call, hi)], t.group_size, t.seed, step, i)
             for i in range(lo, hi, per_call)]
    return Collected(Rollout.concat(parts), len(parts))


class Filtered(NamedTuple):
    """Attributes: advantages [S] fp32; keep [S] bool (the samples that get a backward); non_finite (advantages set
    to 0 because a reward overflowed fp32)."""
    advantages: torch.Tensor
    keep: torch.Tensor
    non_finite: int


def gradient_filter(cfg: DashConfig, rollout: Rollout, step: int, first_sample: int = 0) -> Filtered:
    """Group advantages of the step's samples, and the selection rule's keep mask (loss.selection; by default DASH's
    filter: keep |A| > loss.adv_threshold, GRPO keeps all; dash/rl/selection.py). Filtering happens here, before any
    training forward: a dropped sample costs no compute at all. first_sample: this rank's first sample in the step."""
    adv, non_finite = zero_non_finite(group_advantages(rollout.rewards, cfg.train.group_size))  # [S]
    if non_finite:
        warnings.warn(f"step {step}: {non_finite} non-finite advantages (a reward beyond fp32's range) set to 0; "
                      "those samples carry no policy gradient (counted in rollout/non_finite_adv)")
    adv, keep = select_samples(cfg, rollout.rewards, adv, step, first_sample)  # [S], [S]
    keep &= torch.tensor([len(c) > 0 for c in rollout.completion_ids])  # nothing to train on an empty completion
    return Filtered(adv, keep, non_finite)


def ppo_minibatches(num_samples: int, k: int) -> list[list[int]]:
    """PPO-Mini: every k-th sample. A mini-batch may split a group, which is fine: the advantages were computed on
    whole groups before the split."""
    return [list(range(num_samples))[i::k] for i in range(k)]


class StepCounts(NamedTuple):
    """Counts of one step summed over all ranks.

    Attributes:
        samples: per PPO mini-batch, its samples (filtered ones included).
        tokens: per PPO mini-batch, its completion tokens.
        reward_sum: sum of the step's rewards.
        kept: samples that passed the gradient filter.
    """
    samples: tuple
    tokens: tuple
    reward_sum: float
    kept: float

    @property
    def total_samples(self):
        return sum(self.samples)  # every sample is in exactly one mini-batch


def count_step(rollout: Rollout, keep: torch.Tensor, minibatches: list[list[int]], parallel: Parallel) -> StepCounts:
    """One collective for all the step's counts. Under torchrun it is also where a rank that generated faster waits
    for the slowest one (reported as time/count_sync_s)."""
    samples = [len(mini) for mini in minibatches]
    tokens = [sum(len(rollout.completion_ids[i]) for i in mini) for mini in minibatches]
    summed = parallel.sum(samples + tokens + [float(rollout.rewards.sum()), float(keep.sum())])
    n = len(minibatches)
    return StepCounts(tuple(summed[:n]), tuple(summed[n:2 * n]), summed[-2], summed[-1])


@dataclass
class MicroBatchPlan:
    """Attributes: plan: sample indices of each micro-batch; norms: the loss normaliser of each."""
    plan: list[list[int]]
    norms: list[float]


def micro_batch_plan(cfg: DashConfig, rollout: Rollout, keep: torch.Tensor,
                     counts: tuple[float, float]) -> MicroBatchPlan:
    """The kept samples' micro-batches and normalisers. counts: (samples, completion tokens) of the whole update,
    over all ranks: the global normaliser's input (dash/rl/loss_norm.py)."""
    t, loss = cfg.train, cfg.loss
    if loss.normalizer == "paper" or t.algorithm == "grpo":
        plan = plan_fixed(len(rollout), t.micro_batch_size, keep)  # the paper's micro-batches
    else:  # DASH: survivors packed by length (or into token_budget-token micro-batches)
        lengths = [len(p) + len(c) - 1 for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
        rows = len(rollout) if t.token_budget > 0 else t.micro_batch_size
        plan = plan_balanced(lengths, keep, rows, t.token_budget)
    max_new = cfg.sampling.max_new_tokens
    if loss.normalizer == "global":  # one denominator for the whole update
        norms = [global_normalizer(loss.loss_type, int(counts[0]), int(counts[1]), max_new)] * len(plan)
    else:  # the paper's: each micro-batch's own kept rows / tokens
        norms = [paper_normalizer(loss.loss_type, len(mb), sum(len(rollout.completion_ids[i]) for i in mb), max_new,
                                  len(rollout), t.micro_batch_size) for mb in plan]
    return MicroBatchPlan(plan, norms)


def plan_micro_batches(cfg: DashConfig, rollout: Rollout, filtered: Filtered, minibatches: list[list[int]],
                       counts: StepCounts, device: torch.device) -> list[list[tuple]]:
    """Per PPO mini-batch, its packed micro-batches on `device` with their normalisers: [[(PackedBatch, norm)]]."""
    plans = []
    for j, mini in enumerate(minibatches):
        mini_keep = torch.zeros_like(filtered.keep)  # [S]
        mini_keep[mini] = filtered.keep[mini]
        sub = micro_batch_plan(cfg, rollout, mini_keep, (counts.samples[j], counts.tokens[j]))
        plans.append([(collate(rollout, idx, filtered.advantages, device, cfg.train.share_prompts), norm)
                      for idx, norm in zip(sub.plan, sub.norms)])
    return plans


class UpdateResult(NamedTuple):
    """Attributes: metrics: loss metrics averaged over micro-batches, then the last optimizer step's; micro_batches
    and tokens: real micro-batches and packed tokens back-propagated (all epochs); pads: padding micro-batches run."""
    metrics: dict
    micro_batches: int
    tokens: int
    pads: int


def update_policy(cfg: DashConfig, update, plans: list[list[tuple]], info: DistInfo) -> UpdateResult:
    """ppo_epochs passes over the mini-batches; one optimizer step (`update.step`) per mini-batch per epoch."""
    t = cfg.train
    olds = _old_logps(cfg, update, plans, reuse=t.ppo_epochs * t.ppo_minibatches > 1)
    sums: dict[str, float] = {}
    step_metrics: dict = {}
    n_mb = tokens = pads = 0
    for _ in range(t.ppo_epochs):
        for plan, plan_olds in zip(plans, olds):
            for (mb, norm), old in zip(plan, plan_olds):
                for k, v in update.backward(mb, norm, old).items():
                    sums[k] = sums.get(k, 0.0) + v
                real = norm is not None  # None: an FSDP padding micro-batch (dash/rl/fsdp.py)
                n_mb, pads = n_mb + int(real), pads + int(not real)
                tokens += mb.num_tokens if real else 0  # shared prompt rows count once
            step_metrics = update.step(info)
    metrics = {k: v / max(n_mb, 1) for k, v in sums.items()}
    metrics.update(step_metrics)
    return UpdateResult(metrics, n_mb, tokens, pads)


def _old_logps(cfg: DashConfig, update, plans: list, reuse: bool) -> list[list]:
    """The ratio's denominators of every micro-batch (see TrainConfig.old_logp), all taken before the step's first
    update touches the weights, so a later PPO epoch or mini-batch compares against the policy that sampled."""
    if cfg.train.old_logp == "sampler":
        return [[mb.old_logp for mb, _ in plan] for plan in plans]
    if not reuse:  # one update per sample: on-policy, ratio exactly 1 (the paper's logp.detach())
        return [[None for _ in plan] for plan in plans]
    return [[update.token_logprobs(update.model, mb) for mb, _ in plan] for plan in plans]
