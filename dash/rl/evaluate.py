"""Held-out evaluation: greedy pass@1, sampled pass@1 / pass@k, answer length; used on a schedule and by `dash eval`."""

from __future__ import annotations

import math
import time

from dash.rl.sample import RolloutSampler, prompt_seed

_EVAL_SEED_STEP = -1  # eval seeds live apart from every training step's seeds


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(sampler: RolloutSampler, examples: list, run_seed: int, pass_k: int = 0,
             samples_shown: int = 4) -> tuple[dict, list[dict]]:
    """Scores `examples` (objects with .prompt, .answer); returns (metrics, a few sample completions)."""
    t0 = time.perf_counter()
    prompts = [e.prompt for e in examples]
    seeds = [prompt_seed(run_seed, _EVAL_SEED_STEP, i) for i in range(len(examples))]
    greedy = sampler.generate(prompts, 1, seeds, temperature=0.0)
    rewards, lengths, shown = [], [], []
    for e, req in zip(examples, greedy, strict=True):
        comp = req.completions[0]
        r = sampler.score(comp.text, e.answer, e)  # e: the row, for a TRL-form reward's columns
        rewards.append(r)
        lengths.append(len(comp.token_ids))
        if len(shown) < samples_shown:
            shown.append({"prompt": e.prompt, "completion": comp.text, "answer": e.answer, "reward": r})
    n = max(len(examples), 1)
    metrics = {"eval/greedy_acc": sum(rewards) / n, "eval/answer_len": sum(lengths) / n, "eval/prompts": len(examples)}
    if pass_k > 0:
        sampled = sampler.generate(prompts, pass_k, seeds)
        p1, pk = 0.0, 0.0
        for e, req in zip(examples, sampled, strict=True):
            c = sum(sampler.score(comp.text, e.answer, e) >= 1.0 for comp in req.completions)
            p1 += pass_at_k(pass_k, c, 1)
            pk += pass_at_k(pass_k, c, pass_k)
        metrics["eval/pass@1_sampled"] = p1 / n
        metrics[f"eval/pass@{pass_k}"] = pk / n
    metrics["time/eval_s"] = time.perf_counter() - t0
    return metrics, shown
