"""`dash` command line: `dash <command> [--config PRESET.yaml] [--section.key=value ...]`.

Commands:
  train   RL fine-tuning (`train.algorithm`: dash or grpo); `--resume RUN_OR_CHECKPOINT` continues exactly;
          a log.out_dir that holds a run needs `--resume` or `--overwrite` (which deletes that run first)
  eval    `dash eval [MODEL_RUN_OR_CHECKPOINT]`: pass@1 / pass@k / greedy accuracy / answer lengths on the eval
          section's test sets (default: the held-out split) with eval's sampling settings (docs/evaluation.md);
          a table, and a JSON record at --out (default log.out_dir/eval_results.json). No argument: model.path
  sample  complete `--prompt` texts with the paged sampler (`--n` completions each)
  sft     supervised fine-tuning on prompt + solution rows (`sft.train_path`, or data.train_path; docs/sft.md):
          checkpoints in log.out_dir/sft, `--resume` / `--overwrite` as train, the HF folder at --out (default
          log.out_dir/sft/final). With data.task=arith or scratchpad and no file: the built-in tiny model's warm start
  smoke   load the model of `model.path`, greedy-evaluate it on the held-out split with plain padded decoding
  export  `dash export RUN_OR_CHECKPOINT --out DIR`: an HF folder (safetensors, sharded above --max-shard-size,
          generation_config.json, tokenizer) from a run's latest checkpoint, a checkpoint, or FSDP shards;
          a LoRA run's adapters merged into its base (default, --merge-lora) or alone for peft (--adapters-only)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from dash.config import BUILTIN_TASKS, ConfigError, DashConfig, load_config

_SAMPLES_SHOWN = 5  # completions printed by `smoke`


def _load_task(cfg: DashConfig):
    # lazy: `dash --help` and config errors skip torch
    from dash.rl.task_data import builtin_task

    if cfg.data.task not in BUILTIN_TASKS:
        raise ConfigError(f"data.task={cfg.data.task!r}: only the built-in tasks {BUILTIN_TASKS} are wired to this "
                          "command yet")
    return builtin_task(cfg.data)


def cmd_smoke(cfg: DashConfig) -> int:
    # lazy: `dash --help` and config errors skip torch
    import torch

    from dash.model_io import load_model, load_tokenizer
    from dash.rl.sft import greedy_decode
    from dash.rewards import get_reward
    from dash.runtime import resolve_device, resolve_dtype, resolve_model_path

    task, _, test = _load_task(cfg)  # first: a task this command cannot run is an error before the weights load
    folder = resolve_model_path(cfg.model.path)
    device = resolve_device(cfg.model.device)
    model = load_model(folder, dtype=resolve_dtype(cfg.model.dtype), device=device).eval()
    tokenizer = load_tokenizer(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {folder} ({model.config.model_type}, {n_params / 1e6:.2f}M params) on {device}")

    prompts = [e.prompt for e in test]
    t0 = time.perf_counter()
    with torch.no_grad():
        completions = greedy_decode(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens)
    secs = time.perf_counter() - t0
    reward = get_reward(cfg.data.task)  # each built-in task's reward is registered under the task's name
    rewards = [reward(c, e.answer) for c, e in zip(completions, test, strict=True)]
    for e, c, r in list(zip(test, completions, rewards))[:_SAMPLES_SHOWN]:
        print(f"  {e.prompt!r} -> {c!r} (answer {e.answer}, reward {r:.0f})")
    acc = sum(rewards) / len(rewards)
    print(f"greedy accuracy {acc:.3f} on {len(test)} held-out prompts ({secs:.1f} s)")
    return 0


@contextlib.contextmanager
def _closing(trainer):
    """Closes the trainer on the way out: after an error without waiting for the other ranks, since a peer may be
    stuck in a collective (see close_distributed)."""
    try:
        yield trainer
    except BaseException:
        trainer.close(synchronize=False)
        raise
    trainer.close()


def cmd_train(cfg: DashConfig, args) -> int:
    # lazy: `dash --help` and config errors skip torch
    from dash.rl.trainer import Trainer

    cfg.check_for_training()  # before any set-up work (Trainer.train checks it again for API callers)
    trainer = Trainer(cfg)
    with _closing(trainer):
        trainer.setup(resume=args.resume, overwrite=args.overwrite)
        trainer.train()
    from dash.rl.evaluate import headline  # lazy: `dash --help` and config errors skip torch

    final = [h for h in trainer.history if "time/eval_s" in h]
    if final:
        print(f"done: {trainer.step} steps, {headline(final[-1])}; metrics in {cfg.log.out_dir}/metrics.jsonl")
    return 0


def cmd_eval(cfg: DashConfig, args) -> int:
    from dash.eval_run import format_table, run_eval  # lazy: `dash --help` and config errors skip torch

    if args.source and args.resume:
        raise ConfigError(f"dash eval: give the model, run or checkpoint once ({args.source!r} or --resume "
                          f"{args.resume!r})")
    record = run_eval(cfg, source=args.source or args.resume, out=args.out)
    print(format_table(record))
    print(f"results in {record['results_file']}")
    return 0


def cmd_sample(cfg: DashConfig, args) -> int:
    # lazy: `dash --help` and config errors skip torch
    from dash.model_io import load_model, load_tokenizer
    from dash.rl.rollout_sampler import RolloutSampler, prompt_seed
    from dash.runtime import resolve_device, resolve_dtype, resolve_model_path

    from dash.tokenizer import encode_problem

    if not args.prompt:
        raise SystemExit("dash sample: give at least one --prompt TEXT")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 (completions per prompt), got {args.n}")
    folder = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(folder)
    for prompt in args.prompt:  # before the weights load: a prompt the tokenizer cannot encode is a clear error
        problem = encode_problem(tokenizer, prompt)
        if problem:
            raise ConfigError(f"--prompt: {problem}")
    model = load_model(folder, dtype=resolve_dtype(cfg.model.dtype), device=resolve_device(cfg.model.device))
    sampler = RolloutSampler(model.eval(), tokenizer, cfg.sampling, reward_fn=lambda c, a: 0.0)
    seeds = [prompt_seed(cfg.train.seed, 0, i) for i in range(len(args.prompt))]
    for prompt, req in zip(args.prompt, sampler.generate(args.prompt, args.n, seeds)):
        for comp in req.completions:
            print(f"{prompt!r} -> {comp.text!r} ({comp.finish_reason})")
    return 0


def cmd_sft(cfg: DashConfig, args) -> int:
    # lazy: `dash --help` and config errors skip torch
    from pathlib import Path

    from dash.rl.sft_data import sft_source

    if sft_source(cfg) is not None:  # the user's prompt + solution file
        # lazy: `dash --help` and config errors skip torch
        from dash.rl.sft_train import run_sft_on_file

        folder = run_sft_on_file(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite)
        print(f"sft: model in {folder} (use --model.path={folder})")
        return 0
    # lazy: `dash --help` and config errors skip torch
    from dash.rl.warmstart import warmstart

    if args.resume or args.overwrite:
        raise ConfigError(f"the built-in warm start (data.task={cfg.data.task}, no sft.train_path) keeps no "
                          "checkpoints to --resume and always replaces --out")
    out = Path(args.out) if args.out else Path(cfg.log.out_dir) / "sft"
    record = warmstart(out, steps=cfg.sft.steps, seed=cfg.data.seed, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr,
                       form=cfg.data.arith_form, digits=cfg.data.arith_digits, task_name=cfg.data.task)
    print(f"sft: greedy test accuracy {record['test_accuracy']:.3f}; model in {out} (use --model.path={out})")
    return 0


def cmd_export(cfg: DashConfig, args) -> int:
    # lazy: `dash --help` and config errors skip torch
    from dash.rl.export import MAX_SHARD_BYTES, export_checkpoint, parse_size
    from dash.runtime import resolve_dtype

    if not args.source or not args.out:
        raise SystemExit("dash export: give the run or checkpoint folder and --out DIR")
    if args.merge_lora and args.adapters_only:
        raise SystemExit("dash export: --merge-lora and --adapters-only exclude each other")
    size = parse_size(args.max_shard_size) if args.max_shard_size else MAX_SHARD_BYTES
    out = export_checkpoint(args.source, args.out, overwrite=args.overwrite, max_shard_bytes=size, base=args.base,
                            dtype=resolve_dtype(args.dtype) if args.dtype else None,
                            lora="merge" if args.merge_lora else "adapters" if args.adapters_only else None)
    if (out / "adapter_config.json").is_file():
        print(f"export: peft adapter folder {out} (peft: AutoPeftModelForCausalLM.from_pretrained({str(out)!r}))")
    else:
        print(f"export: HF model folder {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "sft": cmd_sft, "export": cmd_export,
            "smoke": lambda cfg, args: cmd_smoke(cfg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dash", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("source", nargs="?", default=None, help="export: the run or checkpoint folder to export; "
                        "eval: the HF model folder, run or checkpoint to evaluate (default: model.path)")
    parser.add_argument("--config", default=None, help="YAML preset (configs/*.yaml); defaults are used without one")
    parser.add_argument("--resume", default=None, help="train/eval/sft: a run or checkpoint folder to continue from")
    parser.add_argument("--overwrite", action="store_true",
                        help="train: replace the run already in log.out_dir (deletes its checkpoints and logs); "
                             "export: replace a non-empty --out folder")
    parser.add_argument("--prompt", action="append", default=[], help="sample: a prompt (repeatable)")
    parser.add_argument("--n", type=int, default=1, help="sample: completions per prompt")
    parser.add_argument("--out", default=None, help="sft: the HF folder to write (default: log.out_dir/sft/final; "
                                                    "the built-in warm start: log.out_dir/sft); "
                                                    "export: the HF folder to write; eval: the results JSON file "
                                                    "(default: log.out_dir/eval_results.json)")
    parser.add_argument("--base", default=None, help="export of FSDP shards or LoRA adapters: the HF folder giving "
                                                     "config.json, the tokenizer (and the LoRA base weights) "
                                                     "(default: the run's model.path)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="export: cast the weights (default: the checkpoint's dtype)")
    parser.add_argument("--max-shard-size", default=None, help="export: shard the weights above this (default 5GB)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="export: a LoRA run as one HF folder, adapters merged into the base (the default)")
    parser.add_argument("--adapters-only", action="store_true",
                        help="export: a LoRA run's adapters alone, in peft's layout, naming the base folder")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"dash: config error: {exc}", file=sys.stderr)
        return 2
    if args.overwrite and args.command not in ("train", "export", "sft"):
        print(f"dash {args.command}: --overwrite is a `dash train` / `dash sft` / `dash export` option",
              file=sys.stderr)
        return 2
    if args.source is not None and args.command not in ("export", "eval"):
        print(f"dash {args.command}: unexpected argument {args.source!r} (options are --key=value)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](cfg, args)
    except ConfigError as exc:  # settings the disk contradicts (out_dir, --resume, data files): no trace needed
        print(f"dash {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
