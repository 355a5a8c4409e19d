"""Held-out accuracy over a DASH run on the tiny task, from the shipped SFT warm start: the demo's learning curve.

    python benchmarks/train_curve.py                      # 300 steps of configs/tiny.yaml, ~2-4 minutes on 2 cores
    python benchmarks/train_curve.py --steps 100 --train.algorithm=grpo --out benchmarks/results/curve_grpo

Evaluates greedy accuracy on the 500 held-out prompts every `--eval-every` steps (one evaluation has a standard error
of about 2 points at this accuracy), writes `<out>.png` (accuracy vs wall-clock seconds of training) and `<out>.md`,
prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import emit, result  # noqa: E402
from trainer_runs import quiet_trainer, train_with_evals  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.runtime import resolve_device  # noqa: E402

CPU_THREADS_DEFAULT = 1  # see benchmarks/step_time.py: the tiny model is overhead-bound


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([p["train_s"] for p in points], [100 * p["acc"] for p in points], marker="o")
    ax.set_xlabel("training wall-clock seconds (sampling + reward + backprop; evals excluded)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=CPU_THREADS_DEFAULT)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_curve"))
    args, overrides = parser.parse_known_args()
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    base = load_config(args.config, overrides)
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=args.steps))
    trainer = quiet_trainer(cfg, "dash-curve-")
    t0 = time.perf_counter()  # wall time of training + evaluations, set-up excluded

    def report(p: dict) -> None:
        print(f"step {p['step']:4d}  train {p['train_s']:7.1f} s  held-out greedy accuracy {p['acc']:.3f}",
              file=sys.stderr, flush=True)

    try:
        curve, _ = train_with_evals(trainer, args.steps, args.eval_every, on_eval=report)
    finally:
        trainer.close()
    points = [{k: p[k] for k in ("step", "train_s", "acc")} for p in curve]
    train_s = points[-1]["train_s"]
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    task = (f"{cfg.data.arith_form} ({cfg.data.arith_digits}-digit operands)" if cfg.data.task == "arith"
            else cfg.data.task)
    title = (f"{cfg.train.algorithm} on {task} from {cfg.model.path}: lr {cfg.train.lr:g}, "
             f"{cfg.train.prompts_per_step}x{cfg.train.group_size} per step, {torch.get_num_threads()} thread(s)")
    plot(points, out.with_suffix(".png"), title)
    table = ["| step | training s | held-out greedy acc |", "|---|---|---|"]
    table += [f"| {p['step']} | {p['train_s']:.1f} | {p['acc']:.3f} |" for p in points]
    png = out.with_suffix(".png")
    record = result("train_curve", resolve_device(cfg.model.device).type, algorithm=cfg.train.algorithm,
                    steps=args.steps, lr=cfg.train.lr, acc_start=points[0]["acc"], acc_end=points[-1]["acc"],
                    acc_best=max(p["acc"] for p in points), train_s=train_s, wall_s=wall,
                    threads=torch.get_num_threads(), overrides=overrides, points=points,
                    png=str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png))
    table.append(f"\nsummary: held-out greedy accuracy {record['acc_start']:.3f} -> {record['acc_end']:.3f} in "
                 f"{train_s:.0f} s of training ({args.steps} {cfg.train.algorithm} steps), wall time {wall:.0f} s "
                 f"(evaluations included); plot {record['png']}")
    emit("\n".join(table), record, out, heading=f"# {title}\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
