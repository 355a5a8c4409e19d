"""Evaluation as papers report it: per named test set, n samples per prompt at the eval section's own sampling
settings, pass@1 and unbiased pass@k, an optional greedy pass, and answer-length statistics.

Used on the trainer's schedule (`log.eval_every`) and by `dash eval` (dash/eval_run.py); which sets run and how
they load is dash/rl/eval_sets.py. Metrics of set S are named `eval/S/<metric>`:

    pass@1          mean over prompts of c / n, where c of the prompt's n samples are correct: the mean accuracy
    pass@k          for each k > 1 in eval.k: the unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over prompts
    greedy_acc      (eval.greedy) accuracy of one greedy decode per prompt; with eval.temperature 0 the sampled pass
                    is greedy itself, run once, and greedy_acc equals pass@1
    reward_mean     mean reward of the samples (differs from pass@1 for rewards that are not 0 / 1)
    len_mean, len_median, len_p90    completion length in tokens over all n x prompts samples (a final stop token
                    counted, as the sampler returns it)
    truncated_frac  fraction of samples cut at the length limit (eval's max_new_tokens, or the model's context)
    prompts         prompts evaluated

A sample is correct when its reward is >= 1 (_CORRECT): a summed bonus term alone (e.g. `math+format`'s format
credit) never passes. Length statistics describe the sampled pass, the one pass@k is computed from.

Seeds: prompt i of a set samples with prompt_seed(train.seed, _EVAL_SEED_STEP, i) at every evaluation, so the same
weights give the same numbers and two checkpoints are compared on the same random draws.
Departure from the paper: it reports MATH-500 accuracy from sampling at temperature 0.7, top-p 0.95 (our defaults);
pass@k, the greedy pass and the length statistics are additions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dash.rewards.user import example_columns
from dash.rl.rollout_sampler import prompt_seed

_EVAL_SEED_STEP = -1  # eval seeds live apart from every training step's seeds
_CORRECT = 1.0  # a sample passes when its reward reaches this (binary rewards give exactly 0 or 1)
_LEN_PERCENTILE = 90  # the long tail of answer lengths, reported as len_p90
_TRUNCATED = "length"  # the sampler's finish_reason for a completion cut at its length limit


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    The probability that k samples drawn without replacement from the n include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def length_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    """Answer-length statistics of a set's samples: mean, median, p90 (numpy's linear interpolation) in tokens, and
    the fraction cut at the length limit."""
    if not lengths:
        return {"len_mean": 0.0, "len_median": 0.0, "len_p90": 0.0, "truncated_frac": 0.0}
    arr = np.asarray(lengths, dtype=np.float64)  # [prompts * n]
    return {"len_mean": float(arr.mean()), "len_median": float(np.median(arr)),
            "len_p90": float(np.percentile(arr, _LEN_PERCENTILE)), "truncated_frac": sum(truncated) / len(truncated)}


def _scored(es, outputs) -> tuple[list[list[float]], list]:
    """Rewards [prompts][samples] of the sampler `outputs` for `es.examples`, in one batch call of the reward."""
    prompts, texts, answers, columns, ids, comps = [], [], [], [], [], []
    for e, req in zip(es.examples, outputs, strict=True):
        for comp in req.completions:
            prompts.append(e.prompt)
            texts.append(comp.text)
            answers.append(e.answer)
            columns.append(example_columns(e))
            ids.append(comp.token_ids)
            comps.append(comp)
    flat = es.sampler.reward.score_batch(prompts, texts, answers, columns, ids)  # [prompts * n]
    n = len(outputs[0].completions) if outputs else 0
    return [flat[i * n:(i + 1) * n] for i in range(len(outputs))], comps


def evaluate_set(es, n: int, ks: Sequence[int], greedy: bool, run_seed: int,
                 samples_shown: int = 4) -> tuple[dict[str, float], list[dict]]:
    """Scores one set (`es.name`, `es.examples` with .prompt / .answer, `es.sampler` at eval's settings with the
    set's reward); -> (metrics named without the `eval/<set>/` prefix, a few sampled completions)."""
    examples = es.examples
    prompts = [e.prompt for e in examples]
    seeds = [prompt_seed(run_seed, _EVAL_SEED_STEP, i) for i in range(len(examples))]
    sampled_greedy = es.sampler.cfg.temperature == 0 or es.sampler.cfg.top_k == 1
    rewards, comps = _scored(es, es.sampler.generate(prompts, n, seeds))  # [prompts][n]
    correct = [sum(r >= _CORRECT for r in row) for row in rewards]  # c per prompt
    count = max(len(examples), 1)
    metrics = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / count for k in sorted({1, *ks})}
    metrics["reward_mean"] = sum(map(sum, rewards)) / max(len(comps), 1)
    metrics.update(length_stats([len(c.token_ids) for c in comps], [c.finish_reason == _TRUNCATED for c in comps]))
    if greedy and sampled_greedy:
        metrics["greedy_acc"] = metrics["pass@1"]
    elif greedy:
        g_rewards, _ = _scored(es, es.sampler.generate(prompts, 1, seeds, temperature=0.0))  # [prompts][1]
        metrics["greedy_acc"] = sum(row[0] >= _CORRECT for row in g_rewards) / count
    metrics["prompts"] = len(examples)
    shown = [{"set": es.name, "prompt": e.prompt, "completion": comp.text, "answer": e.answer, "reward": r}
             for e, comp, r in zip(examples, comps[::n], (row[0] for row in rewards))][:samples_shown]
    return metrics, shown


def evaluate_sets(sets: Mapping[str, Any], eval_cfg, run_seed: int,
                  samples_shown: int = 4) -> tuple[dict[str, float], list[dict]]:
    """Every set of `sets` (name -> EvalSet, dash/rl/eval_sets.py) with eval_cfg's n, k and greedy;
    -> ({`eval/<set>/<metric>`: value, `time/eval_s`}, sample completions of every set)."""
    t0 = time.perf_counter()
    metrics, shown = {}, []
    for name, es in sets.items():
        m, s = evaluate_set(es, eval_cfg.n, eval_cfg.k, eval_cfg.greedy, run_seed, samples_shown)
        metrics.update({f"eval/{name}/{key}": value for key, value in m.items()})
        shown += s
    metrics["time/eval_s"] = time.perf_counter() - t0
    return metrics, shown


def set_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """`eval/<set>/<metric>` entries regrouped as {set: {metric: value}} (set names hold no `/`)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def headline(metrics: Mapping[str, float]) -> str:
    """One line per evaluation for the log: each set's pass@1 (and greedy accuracy)."""
    parts = []
    for name, m in set_metrics(metrics).items():
        greedy = f", greedy {m['greedy_acc']:.3f}" if "greedy_acc" in m else ""
        parts.append(f"{name} pass@1 {m['pass@1']:.3f}{greedy}")
    return "; ".join(parts)
