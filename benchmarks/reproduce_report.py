"""Tables and plots of benchmarks/reproduce.py: our measurement of each paper finding beside the paper's numbers.

The paper's numbers are Qwen2.5-0.5B on MATH-500 (Huang et al., arXiv 2505.17218, section 4); ours are a built-in
task (`--config`) on a CPU, so compare directions and ratios, not values.
"""

from __future__ import annotations

import statistics
from pathlib import Path

TARGET_GAIN = 0.03  # "time to target": first eval at >= start accuracy + 3 points (about 1.5 eval standard errors)
COLLAPSE_FRAC = 0.5  # a run "collapses" when an eval falls below half of the start accuracy
EVAL_SE = 0.02  # one 500-prompt eval's standard error at ~25-30% accuracy: differences below it are noise

# The paper (0.5B, MATH): wall time in hours and MATH accuracy (%), read from its tables.
PAPER = {
    "grpo": (38.9, 27.6), "dash": (6.6, 27.2), "no_gf": (6.9, 27.4), "kl": (6.6, 27.2),
    "no_kl": (5.7, 31.4), "ppo_multi": (None, 28.8), "ppo_mini": (None, 29.8), "sft": (None, 8.0), "base": (None, 22.6),
}
TAU_ARMS = ["tau_0", "tau_0.05", "dash", "tau_0.3", "tau_0.6"]  # dash is tau = 0.1
SELECTION_ARMS = ["dash", "pods", "greso", "dppo"]  # dash: the default rule, dash_filter
TAU_OF = {"tau_0": 0.0, "tau_0.05": 0.05, "dash": 0.1, "tau_0.3": 0.3, "tau_0.6": 0.6}


def _ms(values: list[float], fmt: str = ".3f") -> str:
    """mean +- std (std over seeds; a single seed shows no std)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def _acc_at(curve: list[dict], seconds: float) -> float:
    """Accuracy of the last eval whose training time is within `seconds` (the paper's equal-wall-clock cut)."""
    return [p for p in curve if p["train_s"] <= seconds + 1e-9][-1]["acc"]


def summarize(runs: list[dict]) -> dict:
    """Per arm: lists over seeds of the quantities the tables show."""
    by_arm: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        by_arm.setdefault(r["arm"], []).append(r)
    dash_time = {r["seed"]: r["curve"][-1]["train_s"] for r in by_arm.get("dash", [])}
    out = {}
    for arm, rs in by_arm.items():
        start = rs[0]["curve"][0]["acc"]
        target = start + TARGET_GAIN
        reach = [next((p["train_s"] for p in r["curve"] if p["acc"] >= target), None) for r in rs]
        out[arm] = {
            "seeds": len(rs), "start": start,
            "final": [r["curve"][-1]["acc"] for r in rs],
            "best": [max(p["acc"] for p in r["curve"]) for r in rs],
            "s_per_step": [r["s_per_step"] for r in rs],
            "generate_s": [r["generate_s"] for r in rs if "generate_s" in r],
            "train_s": [r["train_s"] for r in rs if "train_s" in r],
            "kept_frac": [r["kept_frac"] for r in rs if "kept_frac" in r],
            "select_kept": [r["select_kept_frac"] for r in rs if "select_kept_frac" in r],
            "skipped": [r["skipped_prompts"] for r in rs if "skipped_prompts" in r],
            "answer_len": [r["curve"][-1]["len"] for r in rs],
            "to_target_s": [t for t in reach if t is not None], "reached": sum(t is not None for t in reach),
            "at_dash_time": [_acc_at(r["curve"], dash_time[r["seed"]]) for r in rs if r["seed"] in dash_time],
            "collapses": sum(min(p["acc"] for p in r["curve"]) < COLLAPSE_FRAC * start for r in rs),
            "jitter": [statistics.fmean(abs(a["acc"] - b["acc"]) for a, b in zip(r["curve"], r["curve"][1:]))
                       for r in rs],
            "curves": [r["curve"] for r in rs],
        }
    return out


def _row(s: dict, arm: str, cols: list[str]) -> str:
    a = s[arm]
    cells = {
        "final": _ms(a["final"]), "best": _ms(a["best"]), "s/step": _ms(a["s_per_step"]),
        "gen": _ms(a["generate_s"]), "train": _ms(a["train_s"]), "kept": _ms(a["kept_frac"], ".2f"),
        "len": _ms(a["answer_len"], ".2f"), "at_dash": _ms(a["at_dash_time"]),
        "to_target": f"{_ms(a['to_target_s'], '.1f')} ({a['reached']}/{a['seeds']})",
        "collapses": f"{a['collapses']}/{a['seeds']}", "jitter": _ms(a["jitter"]),
        "sel_kept": _ms(a["select_kept"], ".2f"), "skipped": _ms(a["skipped"], ".1f"),
        "ratio": _ms([x / g for x, g in zip(a["s_per_step"], s["grpo"]["s_per_step"])]) if "grpo" in s else "n/a",
    }
    return f"| {arm} | " + " | ".join(cells[c] for c in cols) + " |"


HEADERS = {"final": "final acc", "best": "best acc", "s/step": "s / step", "gen": "generate s", "train": "train s",
           "kept": "kept frac", "len": "answer len", "at_dash": "acc at DASH's time", "to_target": "s to target",
           "collapses": "collapses", "jitter": "eval jitter", "ratio": "time / GRPO",
           "sel_kept": "trained / prompts x G", "skipped": "prompts skipped / step"}

EXPERIMENTS = [  # (title, arms, columns, the paper's finding, what to read in ours)
    ("1. GRPO vs DASH", ["grpo", "dash"], ["s/step", "ratio", "gen", "train", "to_target", "final"],
     "GRPO 38.9 h vs DASH 6.6 h (-83%); MATH 27.6 vs 27.2 (equal accuracy)."),
    ("2. Ablation: preemptive sampling alone (no_gf) vs + gradient filtering (dash)", ["grpo", "no_gf", "dash"],
     ["s/step", "ratio", "gen", "train", "kept", "final"],
     "No-GF 6.9 h (-82% vs GRPO), DASH 6.6 h (filtering -4% more); MATH 27.4 vs 27.2."),
    ("3. Filtering threshold sweep", ["no_gf"] + TAU_ARMS, ["kept", "s/step", "train", "final"],
     "Only tau = 0.1 is reported (a sweep was NOT FOUND in the sources)."),
    ("4. KL (beta 0.04) vs no KL", ["kl", "dash"], ["final", "len", "s/step"],
     "No-KL: MATH 31.4 vs 27.2 with KL, 14% less time (5.7 vs 6.6 h), answers ~540-560 vs ~600-640 tokens."),
    ("5. PPO Multi / Mini vs one update per sample", ["dash", "ppo_multi", "ppo_mini"],
     ["s/step", "final", "at_dash", "jitter", "collapses"],
     "At DASH's wall-clock: Multi 28.8, Mini 29.8 vs DASH 27.2 MATH (0.5B), with noisier curves; Mini collapsed "
     "at 1.5B (GSM8K 8.1)."),
    ("6. SFT on reference solutions vs RL from the same start", ["sft", "dash"], ["final", "best", "s/step", "len"],
     "SFT on human traces 8.0 vs DASH 27.2 MATH from a 22.6 base (0.5B): SFT hurt, RL helped."),
    ("7. Sample selection: DASH's filter vs PODS, GRESO, DPPO (time to accuracy)", SELECTION_ARMS,
     ["s/step", "gen", "train", "sel_kept", "skipped", "to_target", "at_dash", "final"],
     "Not in the DASH paper. PODS (arXiv 2504.13818), GRESO (arXiv 2506.02177) and DPPO (arXiv 2603.04135) each "
     "report speed-ups over their own GRPO baselines; docs/selection.md."),
]


def _m(s: dict, arm: str, key: str) -> float:
    return statistics.fmean(s[arm][key])


def verdicts(s: dict) -> dict[str, str]:
    """One plain sentence per experiment, computed from the numbers (so it stays true when the runs change)."""
    out = {}
    noise = lambda d: "within" if abs(d) <= EVAL_SE else "outside"  # noqa: E731
    if {"grpo", "dash"} <= s.keys():
        r = _m(s, "dash", "s_per_step") / _m(s, "grpo", "s_per_step")
        d = _m(s, "dash", "final") - _m(s, "grpo", "final")
        out["1"] = (f"DASH takes {r:.0%} of GRPO's time per step ({1 - r:.0%} less; paper: 17%, -83%); final "
                    f"accuracy DASH - GRPO = {d:+.3f}, {noise(d)} one eval's standard error ({EVAL_SE}).")
    if {"grpo", "no_gf", "dash"} <= s.keys():
        g, n, d = (_m(s, a, "s_per_step") for a in ("grpo", "no_gf", "dash"))
        share = (g - n) / (g - d) if g > d else float("nan")
        out["2"] = (f"Preemptive sampling alone takes {n / g:.0%} of GRPO's step time, filtering then {d / g:.0%}: "
                    f"{share:.0%} of the saving is preemptive sampling (paper: 82 of 83 points). "
                    + ("Here filtering matters more than in the paper because a tiny model's training costs as much "
                       "as its sampling, and filtering removes training work." if share < 0.75 else
                       "As in the paper, most of the saving is preemptive sampling."))
    taus = [a for a in TAU_ARMS if a in s]
    if len(taus) > 1:
        same = [a for a in taus if TAU_OF[a] < 0.5 and abs(_m(s, a, "kept_frac") - _m(s, taus[0], "kept_frac")) < 1e-9]
        if len(same) > 1:  # binary rewards: no |A| between 0 and 1/sqrt(G-1), the low taus are one setting
            out["3"] = (f"tau in {[TAU_OF[a] for a in same]} keep exactly the same samples (kept "
                        f"{_m(s, same[0], 'kept_frac'):.2f}): with binary rewards and std-normalised group "
                        "advantages, the smallest non-zero |A| in a group of G is 1/sqrt(G-1) (0.58 at G = 4, 0.38 "
                        "at G = 8), so any tau below it drops just the all-right / all-wrong groups and the runs are "
                        "identical per seed (their s / step differ only by timing noise)."
                        + (f" tau 0.6 also drops the |A| = 0.5 samples: kept {_m(s, 'tau_0.6', 'kept_frac'):.2f}, "
                           f"final accuracy {_m(s, 'tau_0.6', 'final'):.3f} vs {_m(s, 'dash', 'final'):.3f}."
                           if {"tau_0.6", "dash"} <= s.keys() else ""))
        else:  # |A| takes values between 0 and 0.5 (G = 8 or partial credit): every tau keeps a different set
            out["3"] = ("Kept fraction / final accuracy by tau: " + ", ".join(
                f"{TAU_OF[a]:g}: {_m(s, a, 'kept_frac'):.2f} / {_m(s, a, 'final'):.3f}" for a in taus) + ".")
    if {"kl", "dash"} <= s.keys():
        d = _m(s, "dash", "final") - _m(s, "kl", "final")
        n_len, k_len = _m(s, "dash", "answer_len"), _m(s, "kl", "answer_len")
        out["4"] = (f"No KL - KL final accuracy = {d:+.3f} ({noise(d)} noise; paper +4.2 points); answer length "
                    f"{n_len:.2f} vs {k_len:.2f} tokens at the end"
                    + (" (no length effect)" if abs(n_len - k_len) < 0.5 else "") + "; KL's reference forward costs "
                    f"{_m(s, 'kl', 's_per_step') / _m(s, 'dash', 's_per_step') - 1:+.0%} time per step.")
    if {"dash", "ppo_multi", "ppo_mini"} <= s.keys():
        parts = [f"{a}: {_m(s, a, 'at_dash_time'):.3f} at DASH's wall-clock (DASH {_m(s, 'dash', 'final'):.3f}), "
                 f"eval jitter {_m(s, a, 'jitter'):.3f} vs {_m(s, 'dash', 'jitter'):.3f}, "
                 f"{s[a]['collapses']}/{s[a]['seeds']} collapses" for a in ("ppo_multi", "ppo_mini")]
        out["5"] = "; ".join(parts) + "."
    if {"sft", "dash"} <= s.keys():
        d = _m(s, "sft", "final") - _m(s, "dash", "final")
        out["6"] = (f"SFT - RL final accuracy = {d:+.3f}. "
                    + ("Unlike the paper, continued SFT beats RL here (on arith the reference solutions are exactly "
                       "the answers the reward checks: no omitted reasoning steps, the paper's explanation of SFT-H's "
                       "drop)." if d > EVAL_SE else "As in the paper, SFT does not beat RL from the same start."))
    sel = [a for a in SELECTION_ARMS[1:] if a in s]
    if "dash" in s and sel:
        out["7"] = "; ".join(
            f"{a}: {_m(s, a, 's_per_step') / _m(s, 'dash', 's_per_step'):.0%} of DASH's time per step, target reached "
            f"in {s[a]['reached']}/{s[a]['seeds']} seeds (DASH {s['dash']['reached']}/{s['dash']['seeds']}), final "
            f"accuracy {_m(s, a, 'final') - _m(s, 'dash', 'final'):+.3f} vs DASH" for a in sel) + "."
    return out


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    panels = [(0, ["grpo", "dash"], "train_s"), (3, ["dash", "kl"], "step"), (4, ["dash", "ppo_multi", "ppo_mini"],
              "train_s"), (5, ["dash", "sft"], "train_s")]
    for idx, arms, x in panels:
        ax = axes.flat[idx]
        for arm in [a for a in arms if a in s]:
            curves = s[arm]["curves"]
            xs = [statistics.fmean(c[i][x] for c in curves) for i in range(len(curves[0]))]
            ys = [100 * statistics.fmean(c[i]["acc"] for c in curves) for i in range(len(curves[0]))]
            ax.plot(xs, ys, marker="o", ms=3, label=arm)
        ax.set_xlabel("training seconds" if x == "train_s" else "optimizer step")
        ax.set_ylabel("held-out greedy acc (%), mean over seeds")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].set_title("1. GRPO vs DASH")
    axes.flat[3].set_title("4. KL 0.04 vs none")
    axes.flat[4].set_title("5. PPO Multi / Mini vs DASH")
    axes.flat[5].set_title("6. SFT vs RL from the warm start")
    ax = axes.flat[1]
    arms = [a for a in ["grpo", "no_gf", "dash"] if a in s]
    gen = [statistics.fmean(s[a]["generate_s"]) if s[a]["generate_s"] else 0 for a in arms]
    trn = [statistics.fmean(s[a]["train_s"]) if s[a]["train_s"] else 0 for a in arms]
    ax.bar(arms, gen, label="generate")
    ax.bar(arms, trn, bottom=gen, label="train")
    ax.set_ylabel("seconds per optimizer step")
    ax.set_title("2. where a step's time goes")
    ax.legend(fontsize=8)
    ax = axes.flat[2]
    taus = [a for a in TAU_ARMS if a in s]
    if taus:
        ax.plot([TAU_OF[a] for a in taus], [statistics.fmean(s[a]["kept_frac"]) for a in taus], marker="o",
                label="kept fraction")
        ax.plot([TAU_OF[a] for a in taus], [statistics.fmean(s[a]["final"]) for a in taus], marker="s",
                label="final acc")
    ax.set_xlabel("adv_threshold tau")
    ax.set_title("3. threshold sweep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(s: dict, runs: list[dict], out: Path, args) -> dict:
    """Writes <out>.md and <out>.png; returns the JSON line's own fields (reproduce.py adds the common keys)."""
    import torch

    wall_s = sum(r["wall_s"] for r in runs)  # every run's own wall time, evals included, cached or not
    loads = [r["loadavg_1m"] for r in runs if "loadavg_1m" in r]
    load_note = (f" The machine's 1-minute load average at the end of the runs ranged {min(loads):.1f}-"
                 f"{max(loads):.1f} on 2 cores: above ~1 other work shared the CPU and inflated seconds per step "
                 "unevenly (identical runs, e.g. the tau arms below 0.5, show how much)." if loads else "")

    seeds = max((a["seeds"] for a in s.values()), default=0)
    lines = [f"# The paper's findings on {Path(args.config).name} ({seeds} seeds x "
             f"{args.steps} steps, eval every {args.eval_every}, {torch.get_num_threads()} thread(s))", "",
             f"Produced by `python benchmarks/reproduce.py --config {Path(args.config).name} --steps {args.steps} "
             f"--eval-every {args.eval_every}`; mean ± std over seeds. Start: the shipped SFT warm start, "
             f"held-out greedy accuracy {next(iter(s.values()))['start']:.3f} on {runs[0]['eval_prompts']} test "
             "prompts (one eval's "
             "standard error ~2 points). Paper numbers: Qwen2.5-0.5B on MATH (hours, MATH %). "
             f"Target for 's to target' = start + {TARGET_GAIN:.2f}; a collapse = an eval below "
             f"{COLLAPSE_FRAC:.0%} of the start." + load_note, ""]
    computed = verdicts(s)
    for title, arms, cols, paper in EXPERIMENTS:
        present = [a for a in arms if a in s]
        if not present:
            continue
        lines += [f"## {title}", "", f"Paper: {paper}", "",
                  "| arm | " + " | ".join(HEADERS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [_row(s, a, cols) for a in present] + [""]
        verdict = computed.get(title.split(".")[0])
        if verdict:
            lines += [f"**Ours:** {verdict}", ""]
    per_arm = {a: sum(r["wall_s"] for r in runs if r["arm"] == a) / v["seeds"] for a, v in s.items()}
    lines += [f"Wall time of all {len(runs)} runs: {wall_s / 60:.0f} min (evaluations included); per run: "
              + ", ".join(f"{a} {t:.0f} s" for a, t in per_arm.items()) + f". Plot: `{out.name}.png`.", ""]
    plot(s, out.with_suffix(".png"))
    record = {"steps": args.steps, "seeds": max(a["seeds"] for a in s.values()),
              "arms": {a: {"final": statistics.fmean(v["final"]), "s_per_step": statistics.fmean(v["s_per_step"]),
                           "kept_frac": statistics.fmean(v["kept_frac"]) if v["kept_frac"] else None}
                       for a, v in s.items()},
              "start_acc": next(iter(s.values()))["start"], "wall_s": wall_s, "threads": torch.get_num_threads(),
              "png": out.with_suffix(".png").name}
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return record
