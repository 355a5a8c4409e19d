"""GRPO vs DASH seconds per optimizer step on the same model, data, seed and settings (the design's headline).

    python benchmarks/step_time.py                       # tiny task on CPU, a few minutes
    python benchmarks/step_time.py --steps 5 --config configs/tiny.yaml --train.lr=1e-4

Both algorithms start from the same checkpoint and, per step, draw exactly the same completions (per-prompt seeds,
batch-independent sampling): GRPO with one sampling call per backprop micro-batch of `micro_batch_size` completions
(the paper's baseline), DASH with one call per step and |A| <= adv_threshold filtered before the training forward.
A third row, `dash-paper-mb`, is DASH restricted to the paper's fixed micro-batches of 8 (normalizer=paper), to
separate the gain of preemptive sampling + filtering from the gain of packing survivors into larger micro-batches.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.rl.trainer import Trainer  # noqa: E402

WARMUP_STEPS = 1  # first step pays one-time costs (allocator growth, lazy init); excluded from the means
# The tiny model is overhead-bound: one thread is as fast as two on an idle 2-core machine, and on a shared one
# OpenMP's second thread spins on a descheduled core (steps measured up to 10x slower), which made runs unrepeatable.
CPU_THREADS_DEFAULT = 1


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_variant(cfg, name: str, steps: int, out_dir: Path) -> dict:
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        before = trainer.evaluate()["eval/greedy_acc"]
        rows = []
        for _ in range(steps + WARMUP_STEPS):
            rows.append(trainer.train_step())
        after = trainer.evaluate()["eval/greedy_acc"]
    finally:
        trainer.close()
    timed = rows[WARMUP_STEPS:]
    step_s = [r["time/step_s"] for r in timed]
    mean = lambda key: statistics.fmean(r[key] for r in timed)  # noqa: E731
    return {
        "name": name, "s_per_step": statistics.fmean(step_s), "p50_s": statistics.median(step_s),
        "generate_s": mean("time/generate_s"), "reward_s": mean("time/reward_s"), "train_s": mean("time/train_s"),
        "kept_frac": mean("rollout/kept_frac"), "sampling_calls": mean("rollout/sampling_calls"),
        "micro_batches": mean("train/micro_batches"), "acc_before": before, "acc_after": after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per algorithm")
    parser.add_argument("--threads", type=int, default=CPU_THREADS_DEFAULT,
                        help="torch threads on CPU (0: torch's default); the same for every variant")
    parser.add_argument("--skip-paper-mb", action="store_true", help="skip the dash-paper-mb row")
    args, overrides = parser.parse_known_args()
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    base = load_config(args.config, overrides)
    out_root = Path(tempfile.mkdtemp(prefix="dash-step-time-"))
    variants = [("grpo", "grpo", base.loss.normalizer), ("dash", "dash", base.loss.normalizer)]
    if not args.skip_paper_mb:
        variants.append(("dash-paper-mb", "dash", "paper"))
    results = []
    t_start = time.perf_counter()
    for name, algo, norm in variants:
        cfg = dataclasses.replace(
            base, train=dataclasses.replace(base.train, algorithm=algo),
            loss=dataclasses.replace(base.loss, normalizer=norm),
            log=dataclasses.replace(base.log, out_dir=str(out_root / name), eval_every=0, ckpt_every=0))
        print(f"running {name} ({args.steps} timed steps) ...", file=sys.stderr, flush=True)
        results.append(run_variant(cfg, name, args.steps, out_root / name))
    grpo = results[0]
    print(f"\nstep time, {base.train.prompts_per_step} prompts x G={base.train.group_size} per step, micro-batch "
          f"{base.train.micro_batch_size}, {args.steps} timed steps, {torch.get_num_threads()} threads, "
          f"device {base.model.device}")
    header = f"{'variant':<15}{'s/step':>9}{'p50':>8}{'gen':>8}{'reward':>8}{'train':>8}{'kept':>7}" \
             f"{'calls':>7}{'mbs':>6}{'acc0':>7}{'acc':>7}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:<15}{r['s_per_step']:>9.3f}{r['p50_s']:>8.3f}{r['generate_s']:>8.3f}{r['reward_s']:>8.3f}"
              f"{r['train_s']:>8.3f}{r['kept_frac']:>7.2f}{r['sampling_calls']:>7.0f}{r['micro_batches']:>6.1f}"
              f"{r['acc_before']:>7.3f}{r['acc_after']:>7.3f}{r['s_per_step'] / grpo['s_per_step']:>7.3f}")
    dash = results[1]
    record = {
        "bench": "step_time", "steps": args.steps, "config": Path(args.config).name, "overrides": overrides,
        "grpo_s_per_step": grpo["s_per_step"], "dash_s_per_step": dash["s_per_step"],
        "ratio": dash["s_per_step"] / grpo["s_per_step"], "grpo_acc": grpo["acc_after"], "dash_acc": dash["acc_after"],
        "acc_before": grpo["acc_before"], "kept_frac": dash["kept_frac"], "variants": results,
        "device": str(base.model.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "git_sha": _git_sha(),
        "wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
