"""What one RL step reports: the wall time of its phases and its metrics dict, kept out of the algorithm's way.

The metric names are an interface: the logger (metrics.jsonl, TensorBoard), the benchmarks (benchmarks/step_time.py,
benchmarks/reproduce_report.py) and the tests read them. `rollout/*` describe the samples (fractions over all
ranks, `rank_*` over this rank's share), `train/*` the update, `time/*` seconds, `reward/*` the reward function's
failures. Times are this rank's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from dash.rl.phases import Collected, Filtered, StepCounts, UpdateResult

_MIN_SECONDS = 1e-9  # a throughput's floor denominator: a zero-length phase must not divide by zero


class PhaseTimer:
    """Wall seconds of the step's phases. Nested phases count in both (time/train_s includes time/count_sync_s).

    Attributes:
        seconds: phase name -> seconds; `generate` leaves out the reward function's time, which is in `reward`.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    @contextmanager
    def generation(self) -> Iterator[None]:
        """The sampling phase, with the reward function's share (the sampler's own clock) split off as `reward`."""
        reward_s0, t0 = self.sampler.reward_seconds, time.perf_counter()
        yield
        self.seconds["reward"] = self.sampler.reward_seconds - reward_s0
        self.seconds["generate"] = time.perf_counter() - t0 - self.seconds["reward"]


def step_metrics(collected: Collected, filtered: Filtered, counts: StepCounts, result: UpdateResult,
                 timer: PhaseTimer, reward_stats) -> dict:
    """The step's metrics: the update's (loss averages, then the last optimizer step's), then the step's own."""
    rollout = collected.rollout
    S, kept = len(rollout), int(filtered.keep.sum())
    S_all = counts.total_samples  # over all ranks
    sec = timer.seconds
    metrics = dict(result.metrics)
    metrics.update({
        "rollout/reward_mean": counts.reward_sum / S_all, "rollout/kept_frac": counts.kept / S_all,
        "rollout/rank_kept_frac": kept / S,
        "rollout/completion_len": rollout.completion_tokens() / S, "rollout/sampling_calls": collected.calls,
        "train/micro_batches": result.micro_batches, "train/tokens": result.tokens,
        "train/pad_micro_batches": result.pads,
        "train/skipped_samples": S - kept, "rollout/non_finite_adv": filtered.non_finite,
        "time/generate_s": sec["generate"], "time/reward_s": sec["reward"], "time/train_s": sec["train"],
        "time/count_sync_s": sec["count_sync"],
        "time/gen_tok_s": rollout.completion_tokens() / max(sec["generate"], _MIN_SECONDS),
        "reward/failed_calls": reward_stats.failures,
        "reward/no_reward": reward_stats.no_reward,  # None from a TRL-form reward: scored 0, not a failure
    })
    return metrics
