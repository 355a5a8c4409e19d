"""Re-measure the paper's findings on the built-in tiny task: six experiments and the sample-selection rules, each
arm over several seeds.

    python benchmarks/reproduce.py                 # 3 seeds x 150 steps x 14 arms (11 paper arms: ~30 min, 1 core)
    python benchmarks/reproduce.py --smoke         # 1 seed, 3 steps, 64 eval prompts, to runs/: checks the pipeline

Every arm starts from the shipped SFT warm start (builtin:tiny-sft) and changes one thing of `configs/tiny.yaml`
(see ARMS). Runs are sequential on one thread so their seconds per step compare; a seed changes the sampling seeds
(`train.seed`), never the data split (the warm start was trained on split seed 0). Finished runs are cached in
`<out>_runs.jsonl` and reused on a re-run with the same config, lr, steps and eval settings, so a killed run loses one
arm at most. The `sft` arm (the annealing control) trains on the task's SFT traces at the RL arms' lr (`train.lr`)
for the same steps.
Writes `<out>.md` (one table per experiment, the paper's numbers beside ours; see benchmarks/reproduce_report.py),
`<out>.png` (one panel per experiment) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import result  # noqa: E402
from trainer_runs import eval_point, quiet_trainer, train_with_evals  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.runtime import resolve_device  # noqa: E402

WARMUP_STEPS = 1  # excluded from seconds per step (allocator growth, lazy init), as in step_time.py
CPU_THREADS_DEFAULT = 1  # as benchmarks/step_time.py: the tiny model is overhead-bound, one thread is repeatable
PPO_MINI_ROWS = 8  # the paper's PPO-Mini: mini-batches of 8 samples, so 256 / 8 = 32 optimizer steps per batch
PPO_MULTI_EPOCHS = 3  # the paper's PPO-Multi: K = 3 passes over all 256 samples

# name -> config overrides on top of configs/tiny.yaml (DASH: threshold 0.1, no KL, one update per sample).
ARMS: dict[str, list[str]] = {
    "grpo": ["--train.algorithm=grpo"],
    "dash": [],
    "no_gf": ["--loss.gradient_filtering=false"],
    "tau_0": ["--loss.adv_threshold=0"],
    "tau_0.05": ["--loss.adv_threshold=0.05"],
    "tau_0.3": ["--loss.adv_threshold=0.3"],
    "tau_0.6": ["--loss.adv_threshold=0.6"],  # above |A| = 0.5: the first threshold that drops informative samples
    "kl": ["--loss.beta=0.04"],
    "ppo_multi": [f"--train.ppo_epochs={PPO_MULTI_EPOCHS}"],
    "ppo_mini": [],  # ppo_minibatches is set from the step's sample count in arm_config
    "sft": [],  # continued supervised fine-tuning on the task's SFT traces at train.lr (run_sft_arm)
    # Sample selection beyond DASH's filter (dash/rl/selection.py, docs/selection.md), each at its default settings.
    "pods": ["--loss.selection.rule=pods"],
    "greso": ["--loss.selection.rule=greso"],
    "dppo": ["--loss.selection.rule=dppo"],
}


def arm_config(base_path: str, arm: str, seed: int, steps: int, extra: list[str]):
    cfg = load_config(base_path, ARMS[arm] + extra + [f"--train.seed={seed}", f"--train.steps={steps}"])
    if arm == "ppo_mini":
        rows = cfg.train.prompts_per_step * cfg.train.group_size
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ppo_minibatches=rows // PPO_MINI_ROWS))
    return cfg


def run_rl_arm(cfg, steps: int, eval_every: int) -> dict:
    """Train `steps` optimizer steps; held-out greedy accuracy every `eval_every` steps (evals not timed)."""
    trainer = quiet_trainer(cfg, "dash-repro-")
    try:
        curve, rows = train_with_evals(trainer, steps, eval_every)
        eval_prompts = len(trainer.test_examples)
    finally:
        trainer.close()
    timed = rows[WARMUP_STEPS:] or rows  # the first step pays one-time costs (as in step_time.py)
    mean = lambda key: statistics.fmean(r[key] for r in timed)  # noqa: E731
    return {"curve": curve, "s_per_step": mean("time/step_s"), "kept_frac": mean("rollout/kept_frac"),
            "select_kept_frac": mean("select/kept_frac"), "skipped_prompts": mean("select/skipped_prompts"),
            "eval_prompts": eval_prompts,
            "generate_s": mean("time/generate_s"), "train_s": mean("time/train_s"),
            "reward": [r["rollout/reward_mean"] for r in rows], "completion_len": mean("rollout/completion_len")}


def run_sft_arm(cfg, steps: int, eval_every: int) -> dict:
    """Continued SFT from the same warm start, the annealing control of issue 23: `steps` AdamW steps at the RL arms'
    lr (`train.lr`) on `prompts_per_step` of the task's SFT traces each (`example.solution` of the config's task data:
    the answer + EOS on arith, the demonstrator's trace on scratchpad). Same start, lr and steps as the RL arms, so an
    RL gain over it is more than what further training at that lr gives."""
    from dash.rl.sft import run_sft

    trainer = quiet_trainer(cfg, "dash-repro-sft-")  # the same model, tokenizer, splits and evaluator as the RL arms
    clock = {"train_s": 0.0, "since": 0.0}
    try:
        curve = [eval_point(trainer, 0, 0.0)]

        def on_log(step: int, _metrics: dict) -> None:
            clock["train_s"] += time.perf_counter() - clock["since"]
            curve.append(eval_point(trainer, step, clock["train_s"]))  # evaluate() puts the model back in train mode
            clock["since"] = time.perf_counter()

        clock["since"] = time.perf_counter()
        run_sft(trainer.model, trainer.tokenizer, trainer.train_data.examples, steps=steps,
                batch_size=cfg.train.prompts_per_step, lr=cfg.train.lr, seed=cfg.train.seed, log_every=eval_every,
                on_log=on_log)
        eval_prompts = len(trainer.test_examples)
    finally:
        trainer.close()
    return {"curve": curve, "s_per_step": clock["train_s"] / steps, "eval_prompts": eval_prompts}


def config_id(path: str) -> str:
    """The config as a run record names it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def run_arm(base: str, arm: str, seed: int, steps: int, eval_every: int, extra: list[str]) -> dict:
    cfg = arm_config(base, arm, seed, steps, extra)
    t0 = time.perf_counter()
    out = (run_sft_arm if arm == "sft" else run_rl_arm)(cfg, steps, eval_every)
    return {"arm": arm, "seed": seed, "steps": steps, "eval_every": eval_every, "extra": extra,
            "config": config_id(base), "lr": cfg.train.lr, "wall_s": time.perf_counter() - t0,
            "loadavg_1m": os.getloadavg()[0], **out}


def load_cache(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    from reproduce_report import summarize, write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--threads", type=int, default=CPU_THREADS_DEFAULT)
    parser.add_argument("--out", default=None, help="output prefix (default: benchmarks/results/reproduce; with "
                        "--smoke: runs/reproduce_smoke, so a smoke run never overwrites the committed results)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 steps, 64 eval prompts, no cache reuse")
    args, extra = parser.parse_known_args()
    if args.smoke:
        args.seeds, args.steps, args.eval_every = 1, 3, 3
        extra = extra + ["--data.test_size=64"]
    if args.out is None:
        args.out = str(ROOT / ("runs/reproduce_smoke" if args.smoke else "benchmarks/results/reproduce"))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        parser.error("--seeds, --steps and --eval-every must be >= 1")
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_name(out.name + "_runs.jsonl")
    # A cached run is reused only for the same config and lr (records without them, written before the SFT arm
    # took train.lr, are re-run).
    lr = load_config(args.config, extra).train.lr
    settings = (args.steps, args.eval_every, tuple(extra), config_id(args.config), lr)

    def key(r: dict) -> tuple:
        return r["arm"], r["seed"], r["steps"], r["eval_every"], tuple(r["extra"]), r.get("config"), r.get("lr")

    runs = {} if args.smoke else {key(r): r for r in load_cache(cache_path)}
    t0 = time.perf_counter()  # progress messages only
    for seed in range(args.seeds):  # seed-major: an interrupted run still has every arm for the first seeds
        for arm in arms:
            k = (arm, seed, *settings)
            if k in runs:
                continue
            print(f"[{time.perf_counter() - t0:6.0f} s] {arm} seed {seed} ({args.steps} steps)", file=sys.stderr,
                  flush=True)
            runs[k] = run_arm(args.config, arm, seed, args.steps, args.eval_every, extra)
            if not args.smoke:
                with cache_path.open("a") as f:
                    f.write(json.dumps(runs[k]) + "\n")
    selected = [r for k, r in runs.items() if k[0] in arms and k[2:] == settings and k[1] < args.seeds]
    summary = summarize(selected)
    device = resolve_device(load_config(args.config, extra).model.device).type
    print(json.dumps(result("reproduce", device, **write_report(summary, selected, out, args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
