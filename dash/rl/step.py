"""One optimizer step of the RL loop, GRPO baseline and DASH, as the paper's phases (dash/rl/phases.py).

    for step in range(steps):
        examples = data.next_batch(prompts_per_step)
        examples = skip(examples)                  # loss.selection.rule=greso: drop prompts before generation
        rollout  = collect_rollouts(examples)      # dash: preemptive sampling, ONE call; grpo: one per micro-batch
        adv, keep = gradient_filter(rollout)       # group advantages; the selection rule's keep mask (dash:
                                                   # |A| > adv_threshold), before any training forward
        counts   = count_step(rollout, keep)       # one collective: the step's counts over all ranks
        plans    = plan_micro_batches(keep, counts)   # pack the survivors; a normaliser per micro-batch
        update_policy(plans)                       # ppo_epochs x ppo_minibatches of: backward per micro-batch,
                                                   # join ranks, clip, optimizer.step(), lr schedule step
        log ; eval / checkpoint on schedule        # dash/rl/trainer.py

One process and one copy of the weights: the sampler generates from the module the optimizer updates. Under torchrun
each rank samples and trains on its share of the prompts (Parallel, dash/rl/parallel.py: replicas or FSDP2 shards);
timing and the metrics dict are dash/rl/step_report.py, the loss and optimizer step dash/rl/policy_update.py.

Departures from the paper's code, all deliberate:
  * The GRPO baseline makes its 32 small sampling calls first and then trains on the same micro-batches (the paper
    interleaves them); on one device the time is the same sum, and the loss normaliser of the whole step is known.
  * A micro-batch whose samples are all filtered is skipped instead of keeping its row 0 (which only adds a KL term):
    a filtered sample contributes nothing, as the paper's text says.
  * Both algorithms draw exactly the same completions for a step (per-prompt seeds; see dash/rl/rollout_sampler.py).
"""

from __future__ import annotations

from dash.config import DashConfig
from dash.rl.distributed import DistInfo
from dash.rl.parallel import Parallel
from dash.rl.phases import (
    collect_rollouts,
    count_step,
    gradient_filter,
    micro_batch_plan,
    plan_micro_batches,
    ppo_minibatches,
    update_policy,
)
from dash.rl.policy_update import PolicyUpdate, frozen_copy
from dash.rl.rollout import Rollout
from dash.rl.selection import SampleSelector, selection_metrics
from dash.rl.step_report import PhaseTimer, step_metrics

# Names the tests and benchmarks import from here.
StepMicroBatches = micro_batch_plan
__all__ = ["PolicyUpdate", "StepMicroBatches", "frozen_copy", "run_step"]


def run_step(cfg: DashConfig, sampler, update: PolicyUpdate, examples: list, step: int,
             dist_info: DistInfo | None = None, selector: SampleSelector | None = None) -> tuple[dict, Rollout]:
    """One optimizer step (or ppo_epochs x ppo_minibatches of them) of `cfg.train.algorithm`; returns
    (metrics, this rank's rollout).

    `examples` is the whole step's prompt batch (the same list on every rank); under torchrun each rank samples and
    trains on its contiguous share, and prompt k keeps its single-process seed. `selector` carries the selection
    rule's state across steps (GRESO's; the trainer checkpoints it); None: a fresh one.
    """
    parallel = Parallel(update.model, dist_info)
    selector = selector or SampleSelector(cfg)
    total_prompts = len(examples)
    # GRESO: prompts skipped here are never generated (every other rule: all of them go on).
    examples, skipped = selector.before_rollout(examples, step, parallel.info.world_size)
    share = parallel.share(len(examples))
    timer = PhaseTimer(sampler)
    with timer.generation(), parallel.generation():  # FSDP: one all-gather for the whole generation phase
        collected = collect_rollouts(cfg, sampler, examples, step, share)
    rollout = collected.rollout
    filtered = gradient_filter(cfg, rollout, step, first_sample=share[0] * cfg.train.group_size)
    selector.observe(examples, share, rollout.rewards, parallel)
    device = next(update.model.parameters()).device
    with timer.phase("train"):
        with timer.phase("count_sync"):
            minibatches = ppo_minibatches(len(rollout), cfg.train.ppo_minibatches)
            counts = count_step(rollout, filtered.keep, minibatches, parallel)
        plans = plan_micro_batches(cfg, rollout, filtered, minibatches, counts, device)
        plans, _ = parallel.pad(plans, device)  # FSDP: the same micro-batch count on every rank
        result = update_policy(cfg, update, plans, parallel.info)
    metrics = step_metrics(collected, filtered, counts, result, timer, sampler.reward_stats)
    metrics.update(selection_metrics(counts.kept, total_prompts, cfg.train.group_size, skipped))
    return metrics, rollout
