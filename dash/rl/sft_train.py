"""`dash sft` on your own data: supervised fine-tuning of any supported model, with checkpoints and exact resume.

    dash sft --model.path=MODEL_DIR --sft.train_path=solutions.jsonl --sft.steps=500 --sft.lr=1e-5 --log.out_dir=runs/x
    dash train --model.path=runs/x/sft/final ...                       # RL from the SFT model

Purpose: the paper's SFT-H baseline (fine-tune on reference solutions) on the user's model and file, and the usual
first stage before RL. Each step draws `sft.batch_size` rows from a seeded, resumable stream (dash/data.py's
PromptIterator, seed data.seed), packs them (micro-batches of `sft.token_budget` tokens) and takes one
dash/rl/sft.py `sft_step` (solution-masked loss through the fused log-prob kernel), with the lr schedule of
`sft.lr_schedule` / `sft.warmup_steps`.

The run folder is `<log.out_dir>/sft` (so an RL run in log.out_dir and its `--overwrite` leave it alone): claimed
and locked as dash/rl/run_dir.py does for RL (`--resume` continues it, `--overwrite` replaces it), holding
metrics.jsonl and `checkpoints/step-N` (dash/rl/checkpoint.py: safetensors and JSON, no pickle; every
`log.ckpt_every` steps and at the end). At the end the last checkpoint is exported (dash/rl/export.py) as an HF folder,
`--out` or `<run>/final` (config.json, safetensors, generation_config.json, tokenizer files), which
`dash train --model.path` takes. With `model.lora.enabled` only the adapters train; checkpoints hold them alone and
the final folder has them merged into the base (`dash export --adapters-only` on the run gives peft's folder).

Design limits: one process (no torchrun data parallel for SFT yet); no evaluation during SFT (run `dash eval` on the
result). Exact resume: a resumed run reaches bitwise the weights of an uninterrupted one on the same machine and thread
count (tests/rl/test_sft_user.py).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from dash.config import ConfigError, DashConfig, config_to_dict
from dash.data import PromptIterator
from dash.lora import apply_lora, load_adapter
from dash.model_io import load_model, load_tokenizer, read_config
from dash.rl.checkpoint import ADAPTER_DIR, MODEL_DIR, is_sharded_checkpoint, load_checkpoint, save_checkpoint
from dash.rl.checkpoint import set_rng_state
from dash.rl.export import export_checkpoint
from dash.rl.metrics import MetricsLogger
from dash.rl.optim import make_adamw
from dash.rl.run_dir import claim_run_dir
from dash.rl.sft import lr_scheduler, sft_step
from dash.rl.trainer import config_changes
from dash.rl.sft_data import check_sft_source, load_sft_examples, pack_sft_ids, plan_micro_batches
from dash.runtime import resolve_device, resolve_dtype, resolve_model_path, seed_everything

RUN_SUBDIR = "sft"  # under log.out_dir
FINAL_DIR = "final"  # under the run folder, when --out is not given (not "model": that names a checkpoint)
STATE_KIND = "sft"  # in the trainer state: an RL checkpoint is not resumed as an SFT one, nor the reverse


class SFTRun:
    """setup / train / train_step / save_checkpoint / write_model / close, as the RL Trainer."""

    def __init__(self, cfg: DashConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.step = 0
        self.history: list[dict] = []
        self.run_path = Path(cfg.log.out_dir) / RUN_SUBDIR

    def setup(self, resume: str | None = None, overwrite: bool = False, out: str | None = None) -> None:
        """Everything is checked (source file, fields, rows, --resume, --out) before the run folder is claimed and
        before any weight is read."""
        cfg = self.cfg
        check_sft_source(cfg)
        self.out = Path(out) if out else self.run_path / FINAL_DIR
        ckpt, state = load_checkpoint(resume) if resume else (None, None)  # never unpickles
        lora = cfg.model.lora.enabled
        if ckpt and state.get("kind") != STATE_KIND:
            raise ConfigError(f"--resume: {ckpt} is not a `dash sft` checkpoint (an RL run's? resume that with "
                              "dash train)")
        if ckpt and (is_sharded_checkpoint(ckpt) or (ckpt / ADAPTER_DIR).is_dir() != lora):
            raise ConfigError(f"--resume: {ckpt} was written with model.lora.enabled={not lora}; resume it with the "
                              "same model.lora.enabled")
        self._check_out(overwrite or ckpt is not None)
        folder = ckpt / MODEL_DIR if ckpt and not lora else resolve_model_path(cfg.model.path)
        device = resolve_device(cfg.model.device)
        self.tokenizer = load_tokenizer(folder)
        examples = load_sft_examples(cfg, self.tokenizer, read_config(folder).max_position_embeddings)
        self.data = PromptIterator(examples, seed=cfg.data.seed)

        self.run_dir = claim_run_dir(self.run_path, resume=ckpt, resume_step=state["step"] if ckpt else None,
                                     overwrite=overwrite)
        seed_everything(cfg.train.seed)  # LoRA's A init (dropout masks come from the restored state on resume)
        self.model = load_model(folder, dtype=resolve_dtype(cfg.model.dtype), device=device).train()
        self.model.gradient_checkpointing = cfg.train.gradient_checkpointing  # the same switch as RL's
        if lora:  # base frozen: the optimizer holds the adapters alone
            apply_lora(self.model, cfg.model.lora)
            if ckpt:
                try:  # e.g. an adapter for another base model: its error names the file and the tensor
                    load_adapter(self.model, ckpt / ADAPTER_DIR)
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"--resume: {exc}") from None
        s = cfg.sft
        self.optimizer = make_adamw(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, s.steps, s.warmup_steps, s.lr_schedule, s.min_lr_ratio)
        self.logger = MetricsLogger(self.run_path, tensorboard=cfg.log.tensorboard,
                                    purge_step=state["step"] + 1 if ckpt else None)
        if ckpt:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.data.load_state_dict(state["data"])  # refuses other data (size + content fingerprint)
            set_rng_state(state["rng"])
            self.step = state["step"]
            self._say(f"resumed from {ckpt} at step {self.step}")
            changed = config_changes(state.get("config", {}), config_to_dict(cfg))
            if changed:
                warnings.warn(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; the run "
                              "continues, but may differ from what the saved run would have done")
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._say(f"sft: {len(examples)} rows, {n_params / 1e6:.2f}M trainable parameters, {s.steps} steps of "
                  f"{s.batch_size} rows; run folder {self.run_path}")

    def _check_out(self, may_replace: bool) -> None:
        out, run = self.out.resolve(), self.run_path.resolve()
        if out == run or out in run.parents:
            raise ConfigError(f"--out {self.out}: is the run folder {self.run_path} or holds it; the final model "
                              f"would replace its checkpoints (the default is {self.run_path / FINAL_DIR})")
        if out.parent == run and out.name != FINAL_DIR:  # e.g. model/ would read as a checkpoint on --resume
            raise ConfigError(f"--out {self.out}: inside the run folder only {run / FINAL_DIR} (the default) may hold "
                              "the final model; choose a folder outside it")
        custom = out != (run / FINAL_DIR)  # the default lives in the claimed run folder and is the run's own
        if custom and self.out.is_dir() and any(self.out.iterdir()) and not may_replace:
            raise ConfigError(f"--out {self.out}: exists and is not empty; pass --overwrite to replace it")

    def train(self) -> list[dict]:
        cfg = self.cfg
        bar = tqdm(total=cfg.sft.steps, initial=self.step, desc="sft", unit="step",
                   disable=self.quiet or not sys.stderr.isatty())
        while self.step < cfg.sft.steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
            if (cfg.log.ckpt_every and self.step % cfg.log.ckpt_every == 0) or self.step == cfg.sft.steps:
                self.save_checkpoint()
        bar.close()
        return self.history

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples = self.data.next_batch(cfg.sft.batch_size)
        pairs = [(e.columns["prompt_ids"], e.columns["solution_ids"]) for e in examples]
        groups = plan_micro_batches([len(p) + len(s) for p, s in pairs], cfg.sft.token_budget)
        batches = [pack_sft_ids([pairs[i] for i in group]) for group in groups]
        metrics = sft_step(self.model, self.optimizer, self.scheduler, batches, cfg.sft.grad_clip)
        self.step += 1
        metrics.update({"train/micro_batches": float(len(batches)), "data/epoch": float(self.data.epoch),
                        "time/step_s": time.perf_counter() - t0})
        if metrics["train/skipped_update"]:
            self._say(f"sft step {self.step}: non-finite loss or gradient, update skipped")
        if cfg.log.log_every and self.step % cfg.log.log_every == 0:
            self.logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})
        return metrics

    def save_checkpoint(self) -> Path:
        state = {"kind": STATE_KIND, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "data": self.data.state_dict(), "config": config_to_dict(self.cfg)}
        self.last_checkpoint = save_checkpoint(self.run_path, self.step, self.model, self.tokenizer, state,
                                               base_model=str(resolve_model_path(self.cfg.model.path)))
        self._say(f"checkpoint {self.last_checkpoint}")
        return self.last_checkpoint

    def write_model(self) -> Path:
        """The final HF folder (`--out`, else <run>/final) from the run's latest checkpoint; LoRA merged."""
        if getattr(self, "last_checkpoint", None) is None:  # resumed a finished run: nothing trained, re-export
            self.save_checkpoint()
        return export_checkpoint(self.last_checkpoint, self.out, overwrite=True,
                                 lora="merge" if self.cfg.model.lora.enabled else None)

    def close(self) -> None:
        if getattr(self, "logger", None):
            self.logger.close()
        if getattr(self, "run_dir", None):
            self.run_dir.release()

    def _say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stderr)


def run_sft_on_file(cfg: DashConfig, out: str | None = None, resume: str | None = None, overwrite: bool = False,
                    quiet: bool = False) -> Path:
    """`dash sft` on sft.train_path / data.train_path: set up, train, write the HF folder; returns it."""
    run = SFTRun(cfg, quiet=quiet)
    try:
        run.setup(resume=resume, overwrite=overwrite, out=out)
        run.train()
        return run.write_model()
    finally:
        run.close()
