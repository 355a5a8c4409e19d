"""SFT warm start of the tiny model on the arithmetic task: the checkpoint RL starts from.

Purpose: build the 16-token character tokenizer and the ~0.8M-parameter Qwen2-shaped model (TINY_MODEL_CONFIG),
fine-tune it with a fixed STEP budget, measure greedy accuracy on the test split, and save model + tokenizer (HF
folder format) plus `warmstart.json` (accuracy, settings, timings, versions). The repo ships the result in
`dash/assets/tiny-sft/`; re-run its recipe with

    .venv/bin/python -m dash.rl.warmstart [--out DIR] [--steps N] [--seed S]

and that of the learning demo's start (`dash/assets/tiny-add-sft`, 3-digit `a+b` caught mid-way through SFT, see
configs/tiny-add.yaml) with

    .venv/bin/python -m dash.rl.warmstart --out dash/assets/tiny-add-sft --form a+b --digits 3 \
        --schedule constant --steps 250 --threads 1

Design limits:
- A step budget, not a time budget, so the checkpoint depends only on the seed and settings (measured: accuracy
  jitters by 2-3 points between evaluations, so stopping on an accuracy reading would also be noisy). The default
  budget is sized to take a few minutes on 2 idle cores and land in the 20-60% greedy band that leaves RL room.
- A re-run does not reproduce the shipped checkpoints bitwise: they were trained before the loss went through the
  fused log-prob kernel, so a re-run's weights equal them up to fp32 summation order (and float reduction order also
  depends on the torch build and thread count). The shipped checkpoints are pinned; tests and demos load them.
- `dash.model.CausalLM` keeps PyTorch's default init (N(0, 1) embeddings), so `build_tiny_model` applies HF's
  initializer (N(0, initializer_range) weights, zero biases, unit norms) from a private generator. The init scale
  matters a lot at this size: see TINY_MODEL_CONFIG["initializer_range"].
- Threads: on an idle machine torch's default (one per core) is fastest; on a shared machine 2 threads can be
  2x SLOWER than 1 (measured here: 0.33 vs 0.15 s/step at load 2), because the threads wait on each other's
  descheduled core. `--threads 1` is the safe choice when other jobs run.

Departures from the paper: the paper starts RL from a pretrained Qwen2.5-0.5B; our tiny model starts from this SFT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import transformers

from dash.config import BUILTIN_TASKS, DataConfig
from dash.model import CausalLM, ModelConfig
from dash.model_io import load_model, load_tokenizer, save_model
from dash.rewards import get_reward
from dash.rl.sft import greedy_decode, run_sft
from dash.rl.task_data import builtin_task
from dash.tasks.arith import TINY_MODEL_CONFIG, ArithTaskConfig
from dash.tasks.scratchpad import route_stats
from dash.tokenizer import build_arith_tokenizer

TINY_SFT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-sft"
RECORD_FILE = "warmstart.json"

# SFT settings measured on this CPU (AdamW lr 1e-3, batch 128; probes here: lr 1.5e-3 / 2e-3 / 3e-3
# learned slower, so did batch 64 at equal compute). Cosine decay to 10% ended ~3 points above a constant lr.
# 2000 steps reach ~25% greedy: inside the 20-60% band that leaves RL room, in ~3 minutes on 2 idle cores (about
# 0.09 s/step) and about 5 minutes on one core (0.15 s/step).
DEFAULT_STEPS = 2000
BATCH_SIZE = 128
LR = 1e-3
SCHEDULE = "cosine"
MIN_LR_RATIO = 0.1
# A short warmup keeps the first Adam steps (whose second-moment estimate is still tiny) from overshooting.
WARMUP_STEPS = 50
TASK_DEFAULTS = ArithTaskConfig()  # the shipped tiny-sft task (form a+b*c, 2-digit operands)
LOG_EVERY = 100


def build_tiny_model(seed: int = 0, config: dict | None = None) -> CausalLM:
    """A freshly initialised tiny model (TINY_MODEL_CONFIG unless `config` is given), deterministic in `seed`."""
    hf = TINY_MODEL_CONFIG if config is None else config
    model = CausalLM(ModelConfig.from_hf_dict(hf, source="TINY_MODEL_CONFIG"))
    std = float(hf.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() has a fixed order, so the same seed gives the same weights.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def load_warmstart(folder: str | os.PathLike = TINY_SFT_DIR) -> tuple[CausalLM, object, dict]:
    """The shipped (or a re-created) warm start: (model in fp32 on CPU, tokenizer, warmstart.json record)."""
    folder = Path(folder)
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path}: no warm-start record; run `python -m dash.rl.warmstart "
            f"--out {folder}` to create the checkpoint"
        )
    record = json.loads(record_path.read_text())
    return load_model(folder), load_tokenizer(folder), record


def warmstart(
    out: str | os.PathLike = TINY_SFT_DIR,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    form: str = TASK_DEFAULTS.form,
    digits: int = TASK_DEFAULTS.digits,
    schedule: str = SCHEDULE,
    task_name: str = "arith",
) -> dict:
    """Train, evaluate and save the warm start to `out` (replacing it); returns the record written to warmstart.json.

    The defaults reproduce the shipped checkpoint; `dash sft` passes its config's steps / batch_size / lr.
    `task_name`: a data.task of BUILTIN_TASKS; `form` / `digits` shape the arith task only.
    """
    if task_name not in BUILTIN_TASKS:  # before any work: an unknown name must not train the arith task silently
        raise ValueError(f"warmstart: task_name={task_name!r} is not one of the built-in tasks {BUILTIN_TASKS}")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    # The task's splits and reward as the trainer builds them (each built-in reward is registered under its task).
    task, train, test = builtin_task(DataConfig(task=task_name, arith_form=form, arith_digits=digits, seed=seed,
                                                test_size=TASK_DEFAULTS.test_size))
    reward = get_reward(task_name)
    what = (f"scratchpad sums of {task.min_terms}-{task.max_terms} terms, {task.chain_fraction:.0%} chain traces"
            if task_name == "scratchpad" else f"{task.form} digits={task.digits}")
    tokenizer = build_arith_tokenizer()
    model = build_tiny_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny model: {n_params / 1e6:.2f}M parameters; task {what}: "
        f"{len(train)} train / {len(test)} test; {steps} SFT steps at batch {batch_size}, lr {lr}",
        flush=True,
    )

    stats = run_sft(
        model,
        tokenizer,
        train,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log_every=LOG_EVERY,
        warmup_steps=WARMUP_STEPS,
        schedule=schedule,
        min_lr_ratio=MIN_LR_RATIO,
    )
    t_eval = time.perf_counter()
    completions = greedy_decode(model, tokenizer, [e.prompt for e in test], task.max_new_tokens)  # one pass
    accuracy = sum(reward(c, e.answer) for c, e in zip(completions, test, strict=True)) / len(test)
    routes = {}
    if task_name == "scratchpad":  # which route the greedy policy takes, and how well each works
        routes = {"greedy_routes": route_stats(completions, [e.answer for e in test])}
    eval_s = time.perf_counter() - t_eval
    wall = time.perf_counter() - t_start
    print(
        f"greedy test accuracy {accuracy:.3f} on {len(test)} prompts; SFT {stats['wall_time_s']:.1f}s, "
        f"eval {eval_s:.1f}s, total {wall:.1f}s",
        flush=True,
    )

    record = {
        "test_accuracy": accuracy,
        "test_size": len(test),
        "task_name": task_name,
        "task": dataclasses.asdict(task),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": WARMUP_STEPS,
        "schedule": schedule,
        "min_lr_ratio": MIN_LR_RATIO,
        "seed": seed,
        **routes,
        "final_loss": stats["final_loss"],
        "num_params": n_params,
        "sft_wall_time_s": round(stats["wall_time_s"], 1),
        "sft_cpu_time_s": round(stats["cpu_time_s"], 1),
        "total_wall_time_s": round(wall, 1),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # 1-minute load average before / after: the CPU is shared, so a high value means the wall times are inflated.
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    out = Path(out)
    save_model(model, out, tokenizer=tokenizer, overwrite=True)
    tmp = out / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / RECORD_FILE)  # atomic: a reader never sees half a record
    print(f"saved {out}", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dash.rl.warmstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_SFT_DIR, help=f"output folder (default {TINY_SFT_DIR})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"SFT steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split, init and batches (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    parser.add_argument("--form", default=TASK_DEFAULTS.form,
                        help=f"task expression shape, a key of dash.tasks.arith.FORMS (default {TASK_DEFAULTS.form})")
    parser.add_argument("--digits", type=int, default=TASK_DEFAULTS.digits,
                        help=f"operand width (default {TASK_DEFAULTS.digits})")
    parser.add_argument("--task", choices=BUILTIN_TASKS, default="arith",
                        help="built-in task (default arith; scratchpad: the reasoning task, dash/tasks/scratchpad.py)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default=SCHEDULE,
                        help=f"lr after the warmup (default {SCHEDULE})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warmstart(args.out, steps=args.steps, seed=args.seed, form=args.form, digits=args.digits, schedule=args.schedule,
              task_name=args.task)


if __name__ == "__main__":
    main()
