"""GRPO vs DASH seconds per optimizer step on the same model, data, seed and settings (the design's headline).

    python benchmarks/step_time.py                       # tiny task on CPU, a few minutes
    python benchmarks/step_time.py --steps 5 --config configs/tiny.yaml --train.lr=1e-4

Both algorithms start from the same checkpoint and, per step, draw exactly the same completions (per-prompt seeds,
batch-independent sampling): GRPO with one sampling call per backprop micro-batch of `micro_batch_size` completions
(the paper's baseline), DASH with one call per step and |A| <= adv_threshold filtered before the training forward.
A third row, `dash-paper-mb`, is DASH restricted to the paper's fixed micro-batches of 8 (normalizer=paper), to
separate the gain of preemptive sampling + filtering from the gain of packing survivors into larger micro-batches.
Every row packs a group's prompt once per micro-batch (train.share_prompts); `--share-ablation` adds grpo and dash
rows without it. `tokens` is the packed rows forwarded and back-propagated per step.
Prints a table, a one-line summary, then one JSON line; saves a bar chart of the step split to `--plot`.

    python benchmarks/step_time.py --nproc 2             # DASH on 1 process vs 2 torchrun processes (ddp, fsdp)

`--nproc N` instead times DASH alone, with the same global batch, on one process and on N torchrun processes
(`torchrun --standalone`, gloo, 1 torch thread each), once with train.parallel=ddp and once with fsdp, and reports the
scaling and the time lost to imbalance: each rank samples its own prompts, so ranks finish generation, and (after
filtering, which leaves them different numbers of kept samples) training, at different times, and wait for the
slowest at the next collective. Lost time per phase = max over ranks - mean over ranks of that phase's busy time,
i.e. what a perfect rebalancer could save. No evaluation runs in this mode.

    python benchmarks/step_time.py --config configs/qwen2.5-0.5b-math.yaml --random-model qwen2.5-0.5b \
        --steps 1 --skip-paper-mb --plot "" --sampling.max_new_tokens=64     # `make gpu-check`: the paper's shape

`--random-model SHAPE` trains a random model of benchmarks/random_qwen.py's SHAPE (no download) on the arith task
with a code-point parity reward instead of the config's model and data, keeping the config's batch shape, sampling
and optimizer: with the paper preset, 64 prompts x G=4, micro-batches of 8, bf16 with fp32 masters, top-k 50, on a
GPU (completions shortened by --sampling.max_new_tokens to fit a time budget). `tiny` is the CPU dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
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
from dash.runtime import resolve_device  # noqa: E402
from common import emit, result  # noqa: E402
from random_qwen import SHAPES, write_model  # noqa: E402

WARMUP_STEPS = 1  # first step pays one-time costs (allocator growth, lazy init); excluded from the means
# The tiny model is overhead-bound: one thread is as fast as two on an idle 2-core machine, and on a shared one
# OpenMP's second thread spins on a descheduled core (steps measured up to 10x slower), which made runs unrepeatable.
CPU_THREADS_DEFAULT = 1
RANDOM_REWARD = f"{ROOT / 'benchmarks/random_qwen.py'}:code_point_parity"  # --random-model's reward
RANDOM_TEST_SIZE = 8  # --random-model: held-out prompts per evaluation (a random model's accuracy is noise)


def heldout_acc(metrics: dict) -> float:
    """Greedy held-out accuracy, or pass@1 where the config turns greedy evaluation off (the paper presets)."""
    return metrics.get("eval/heldout/greedy_acc", metrics.get("eval/heldout/pass@1"))


def run_variant(cfg, name: str, steps: int, out_dir: Path) -> dict:
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        before = heldout_acc(trainer.evaluate())
        rows = []
        for _ in range(steps + WARMUP_STEPS):
            rows.append(trainer.train_step())
        after = heldout_acc(trainer.evaluate())
    finally:
        trainer.close()
    timed = rows[WARMUP_STEPS:]
    step_s = [r["time/step_s"] for r in timed]
    mean = lambda key: statistics.fmean(r[key] for r in timed)  # noqa: E731
    return {
        "name": name, "s_per_step": statistics.fmean(step_s), "p50_s": statistics.median(step_s),
        "generate_s": mean("time/generate_s"), "reward_s": mean("time/reward_s"), "train_s": mean("time/train_s"),
        "kept_frac": mean("rollout/kept_frac"), "sampling_calls": mean("rollout/sampling_calls"),
        "micro_batches": mean("train/micro_batches"), "train_tokens": mean("train/tokens"), "acc_before": before,
        "acc_after": after,
    }


def run_worker(cfg, steps: int, out: str) -> None:
    """One torchrun rank (or the lone process) of --nproc: DASH steps, this rank's timed rows to out.rank<r>.json."""
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        rows = [trainer.train_step() for _ in range(steps + WARMUP_STEPS)]
    finally:
        trainer.close()
    Path(f"{out}.rank{trainer.dist.rank}.json").write_text(json.dumps(rows[WARMUP_STEPS:]))


def summarise_ranks(name: str, nproc: int, ranks: list[list[dict]]) -> dict:
    """Per-step rows of every rank -> step time and the time lost to imbalance (see the module docstring)."""
    def per_step(fn):  # mean over steps of fn(list of this step's rows, one per rank)
        return statistics.fmean(fn(rows) for rows in zip(*ranks, strict=True))

    def lost(phase):  # max - mean over ranks of a phase's busy seconds
        return per_step(lambda rows: max(map(phase, rows)) - statistics.fmean(map(phase, rows)))

    gen = lambda r: r["time/generate_s"] + r["time/reward_s"]  # noqa: E731
    # the training phase minus the two collectives' waits (counts after generation, gradients after backward)
    train = lambda r: r["time/train_s"] - r["time/count_sync_s"] - r["time/grad_sync_s"]  # noqa: E731
    return {
        "name": name, "nproc": nproc, "s_per_step": per_step(lambda rows: max(r["time/step_s"] for r in rows)),
        "generate_s": per_step(lambda rows: statistics.fmean(map(gen, rows))),
        "train_s": per_step(lambda rows: statistics.fmean(map(train, rows))),
        "lost_gen_s": lost(gen), "lost_train_s": lost(train),
        "grad_sync_s": per_step(lambda rows: min(r["time/grad_sync_s"] for r in rows)),
        "rank_kept_min": per_step(lambda rows: min(r["rollout/rank_kept_frac"] for r in rows)),
        "rank_kept_max": per_step(lambda rows: max(r["rollout/rank_kept_frac"] for r in rows)),
        "micro_batches": per_step(lambda rows: statistics.fmean(r["train/micro_batches"] for r in rows)),
        "pad_micro_batches": per_step(lambda rows: sum(r.get("train/pad_micro_batches", 0) for r in rows)),
    }


def run_nproc(args, base, overrides: list[str]) -> int:
    """--nproc N: DASH on 1 process, then on N torchrun processes with ddp and with fsdp; table + JSON line."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("--nproc needs torchrun next to this python")
    out_root = Path(tempfile.mkdtemp(prefix="dash-step-time-nproc-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1), "PYTHONPATH": str(ROOT)}
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    results = []
    for name, nproc, parallel in [("1 process", 1, "ddp"), (f"{args.nproc} x ddp", args.nproc, "ddp"),
                                  (f"{args.nproc} x fsdp", args.nproc, "fsdp")]:
        out = out_root / name.replace(" ", "_")
        launch = [sys.executable] if nproc == 1 else [torchrun, "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*launch, __file__, "--worker", str(out), "--config", args.config, "--steps", str(args.steps),
               "--threads", str(args.threads), *overrides, "--train.algorithm=dash", f"--train.parallel={parallel}",
               f"--log.out_dir={out}"]
        print(f"running {name} ({args.steps} timed steps) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
        results.append(summarise_ranks(name, nproc, ranks))
    one = results[0]
    lines = [f"\nDASH step time, 1 vs {args.nproc} processes: {base.train.prompts_per_step} prompts x "
             f"G={base.train.group_size} per step (split over ranks), {args.steps} timed steps, {args.threads} torch "
             f"thread(s) per process, load average {load_start:.2f} at start"]
    header = f"{'variant':<12}{'s/step':>9}{'speedup':>9}{'gen':>8}{'train':>8}{'lost gen':>10}{'lost train':>11}" \
             f"{'sync':>8}{'kept/rank':>12}{'mbs':>6}{'pads':>6}"
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['name']:<12}{r['s_per_step']:>9.3f}{one['s_per_step'] / r['s_per_step']:>9.2f}"
                     f"{r['generate_s']:>8.3f}{r['train_s']:>8.3f}{r['lost_gen_s']:>10.3f}{r['lost_train_s']:>11.3f}"
                     f"{r['grad_sync_s']:>8.4f}{r['rank_kept_min']:>6.2f}-{r['rank_kept_max']:<5.2f}"
                     f"{r['micro_batches']:>6.1f}{r['pad_micro_batches']:>6.1f}")
    ddp, fsdp = results[1], results[2]
    record = result(
        "step_time_nproc", "cpu", nproc=args.nproc, steps=args.steps, config=Path(args.config).name,
        overrides=overrides, s_per_step_1=one["s_per_step"], s_per_step_ddp=ddp["s_per_step"],
        s_per_step_fsdp=fsdp["s_per_step"], speedup_ddp=one["s_per_step"] / ddp["s_per_step"],
        speedup_fsdp=one["s_per_step"] / fsdp["s_per_step"],
        lost_imbalance_s_ddp=ddp["lost_gen_s"] + ddp["lost_train_s"], variants=results,
        threads_per_process=args.threads, load_start=load_start, load_end=os.getloadavg()[0],
        wall_s=time.perf_counter() - t_start)
    emit("\n".join(lines), record)
    return 0


def random_model_overrides(shape: str) -> list[str]:
    """--random-model: a random model of `shape` (benchmarks/random_qwen.py) on the arith task, rewarded by the
    parity of its completions (about half of a random model's samples, so DASH filters a realistic share); few
    held-out prompts, since a random model's accuracy means nothing."""
    dtype = torch.bfloat16 if shape != "tiny" else torch.float32
    folder = write_model(Path(tempfile.mkdtemp(prefix="dash-random-model-")) / "model", shape, dtype)
    return [f"--model.path={folder}", "--data.task=arith", f"--data.reward={RANDOM_REWARD}",
            f"--data.test_size={RANDOM_TEST_SIZE}", "--log.tensorboard=false"]


def plot_step_split(results: list[dict], path: Path, subtitle: str) -> None:
    """Stacked bars: where each variant's optimizer step goes (generate / reward / train)."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bottom = [0.0] * len(results)
    for key, label in (("generate_s", "generate"), ("reward_s", "reward"), ("train_s", "train")):
        vals = [r[key] for r in results]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(results):
        ax.text(i, bottom[i], f"{r['s_per_step'] / results[0]['s_per_step']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("seconds per optimizer step")
    ax.set_title(f"GRPO vs DASH step time ({subtitle})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per algorithm")
    parser.add_argument("--threads", type=int, default=CPU_THREADS_DEFAULT,
                        help="torch threads on CPU (0: torch's default); the same for every variant")
    parser.add_argument("--skip-paper-mb", action="store_true", help="skip the dash-paper-mb row")
    parser.add_argument("--share-ablation", action="store_true",
                        help="also run grpo and dash with train.share_prompts=false (one prompt copy per sample)")
    parser.add_argument("--plot", default="runs/step_time.png", help="bar chart of the step split ('' to skip)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="compare DASH on 1 process with this many torchrun processes (see above)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one process of --nproc, rows to this prefix
    parser.add_argument("--out", default="", help="also write <out>.md (table) and <out>.json (the JSON line)")
    parser.add_argument("--random-model", choices=sorted(SHAPES),
                        help="train a random model of this shape on the arith task with a parity reward (below)")
    args, overrides = parser.parse_known_args()
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.random_model:
        overrides = random_model_overrides(args.random_model) + overrides  # the caller's overrides win
    base = load_config(args.config, overrides)
    if args.worker:
        run_worker(base, args.steps, args.worker)
        return 0
    if args.nproc:
        if args.nproc < 2:
            raise SystemExit("--nproc must be >= 2")
        return run_nproc(args, base, overrides)
    out_root = Path(tempfile.mkdtemp(prefix="dash-step-time-"))
    share = base.train.share_prompts
    variants = [("grpo", "grpo", base.loss.normalizer, share), ("dash", "dash", base.loss.normalizer, share)]
    if not args.skip_paper_mb:
        variants.append(("dash-paper-mb", "dash", "paper", share))
    if args.share_ablation:
        variants += [("grpo-no-share", "grpo", base.loss.normalizer, False),
                     ("dash-no-share", "dash", base.loss.normalizer, False)]
    results = []
    t_start = time.perf_counter()
    for name, algo, norm, share_prompts in variants:
        cfg = dataclasses.replace(
            base, train=dataclasses.replace(base.train, algorithm=algo, share_prompts=share_prompts),
            loss=dataclasses.replace(base.loss, normalizer=norm),
            log=dataclasses.replace(base.log, out_dir=str(out_root / name), eval_every=0, ckpt_every=0))
        print(f"running {name} ({args.steps} timed steps) ...", file=sys.stderr, flush=True)
        results.append(run_variant(cfg, name, args.steps, out_root / name))
    grpo = results[0]
    device = resolve_device(base.model.device).type
    lines = [f"\nstep time, {base.train.prompts_per_step} prompts x G={base.train.group_size} per step, micro-batch "
             f"{base.train.micro_batch_size}, {args.steps} timed steps, {torch.get_num_threads()} threads, "
             f"device {device}"]
    header = f"{'variant':<15}{'s/step':>9}{'p50':>8}{'gen':>8}{'reward':>8}{'train':>8}{'kept':>7}" \
             f"{'calls':>7}{'mbs':>6}{'tokens':>8}{'acc0':>7}{'acc':>7}{'ratio':>7}"
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['name']:<15}{r['s_per_step']:>9.3f}{r['p50_s']:>8.3f}{r['generate_s']:>8.3f}"
                     f"{r['reward_s']:>8.3f}{r['train_s']:>8.3f}{r['kept_frac']:>7.2f}{r['sampling_calls']:>7.0f}"
                     f"{r['micro_batches']:>6.1f}{r['train_tokens']:>8.0f}"
                     f"{r['acc_before']:>7.3f}{r['acc_after']:>7.3f}{r['s_per_step'] / grpo['s_per_step']:>7.3f}")
    dash = results[1]
    record = result(
        "step_time", device, steps=args.steps, config=Path(args.config).name, overrides=overrides,
        random_model=args.random_model, max_new_tokens=base.sampling.max_new_tokens,
        grpo_s_per_step=grpo["s_per_step"], dash_s_per_step=dash["s_per_step"],
        ratio=dash["s_per_step"] / grpo["s_per_step"], grpo_acc=grpo["acc_after"], dash_acc=dash["acc_after"],
        acc_before=grpo["acc_before"], kept_frac=dash["kept_frac"], variants=results,
        threads=torch.get_num_threads(), wall_s=time.perf_counter() - t_start,
        png=args.plot or None)
    if args.plot:
        plot_step_split(results, Path(args.plot), f"{base.train.prompts_per_step} prompts x G={base.train.group_size}, "
                        f"{args.steps} steps, {torch.get_num_threads()} thread(s)")
    lines.append(f"summary: DASH {dash['s_per_step']:.3f} s/step vs GRPO {grpo['s_per_step']:.3f} "
                 f"({record['ratio']:.2f}x the time), held-out accuracy {grpo['acc_before']:.3f} -> GRPO "
                 f"{grpo['acc_after']:.3f} / DASH {dash['acc_after']:.3f}"
                 + (f"; plot {args.plot}" if args.plot else ""))
    emit("\n".join(lines), record, args.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
