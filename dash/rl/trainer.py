"""The RL trainer: set-up, the step loop, evaluation, logging, checkpoints and exact resume.

    trainer = Trainer(cfg); trainer.setup(resume=None); trainer.train(); trainer.close()

One process, one copy of the weights: the sampler (dash.engine) generates from `self.model`, the very module the
optimizer updates, so the next step's sampling sees the new weights with no copy, reload or sync. The step itself
(sampling schedule, filtering, packing, loss) is dash/rl/step.py. Under torchrun every rank runs this loop: rank 0
alone logs, evaluates and (DDP) checkpoints; with `train.parallel: fsdp` every rank joins the parameter gather of an
evaluation and writes its shards of a checkpoint (dash/rl/distributed.py, dash/rl/fsdp.py).
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from dash.config import BUILTIN_TASKS, ConfigError, DashConfig, config_to_dict
from dash import model_io  # called as model_io.load_model: tests patch it to prove the checks come first
from dash.rewards import get_reward
from dash.rl.checkpoint import (
    ADAPTER_DIR,
    MODEL_DIR,
    is_sharded_checkpoint,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from dash.rl.distributed import close_distributed, init_distributed
from dash.rl.eval_sets import check_eval_sets, load_eval_sets
from dash.rl.evaluate import evaluate_sets, headline
from dash.rl.fsdp import gathered, shard_model
from dash.rl.metrics import MetricsLogger
from dash.rl.optim import build_optimizer
from dash.rl.policy_update import PolicyUpdate, frozen_copy
from dash.rl.run_dir import claim_run_dir
from dash.rl.rollout_sampler import RolloutSampler
from dash.rl.selection import SampleSelector
from dash.rl.step import run_step
from dash.rl.task_data import check_data_files, load_task, prompt_token_limit
from dash.runtime import resolve_device, resolve_dtype, resolve_model_path, seed_everything


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config_to_dict trees, leaving out `log.*` (where output goes,
    how often it is written) and `eval.*` (how it is measured): nothing the run computes depends on them."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if name in ("log", "eval"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name} ({a!r} -> {b!r})")
    return out


def check_before_loading(cfg: DashConfig, folder: Path) -> None:
    """What the config cannot know alone, checked before any weights or data are read: the data files exist, and a
    completion fits the model's context (one capped there would still be normalised by the uncapped length)."""
    if cfg.data.task not in BUILTIN_TASKS:  # a file, a glob that matches, a save_to_disk folder with the split asked for
        check_data_files(cfg.data)
    context = model_io.read_config(folder).max_position_embeddings
    if cfg.sampling.max_new_tokens >= context:
        raise ConfigError(f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} must be below the model's context "
                          f"({context} tokens, {folder}/config.json), which also holds the prompt")
    prompt_token_limit(cfg.data, cfg.sampling, context)  # ConfigError if a fixed KV pool leaves no room for a prompt
    check_eval_sets(cfg, context)  # eval set files and eval's answer length, before the weights load too


class Trainer:
    def __init__(self, cfg: DashConfig, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        self.step = 0
        self.history: list[dict] = []

    # -- set-up ------------------------------------------------------------------------------------------------
    def setup(self, resume: str | None = None, overwrite: bool = False, claim_out_dir: bool = True) -> None:
        """`overwrite`: replace a run already in log.out_dir; `claim_out_dir=False` (`dash eval`): neither lock nor
        check log.out_dir (dash/rl/run_dir.py), which an evaluation only appends to."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        ckpt, state = load_checkpoint(resume) if resume else (None, None)  # never unpickles (checkpoint.py)
        fsdp = cfg.train.parallel == "fsdp"
        if ckpt and is_sharded_checkpoint(ckpt) != fsdp:
            raise ConfigError(f"--resume: {ckpt} was written with train.parallel={'ddp' if fsdp else 'fsdp'}; "
                              f"resume it with the same train.parallel")
        # A sharded checkpoint has no full model folder: build the architecture from the run's model, then load.
        # A LoRA checkpoint holds the adapters alone: the base is the run's model.path.
        lora = cfg.model.lora.enabled
        if ckpt and (ckpt / ADAPTER_DIR).is_dir() != lora:
            raise ConfigError(f"--resume: {ckpt} was written with model.lora.enabled={not lora}; resume it with the "
                              "same model.lora.enabled")
        folder = ckpt / MODEL_DIR if ckpt and not fsdp and not lora else resolve_model_path(cfg.model.path)
        device = resolve_device(cfg.model.device)
        self.dist = init_distributed(device)
        if device.type == "cuda" and self.dist.enabled:  # one GPU per rank
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        check_before_loading(cfg, folder)
        resumed_step = state["step"] if ckpt else None
        self.run_dir = None  # locked until close(); refuses a folder that holds another run or cannot be written
        if claim_out_dir and self.dist.is_main:
            self.run_dir = claim_run_dir(cfg.log.out_dir, resume=ckpt, resume_step=resumed_step, overwrite=overwrite)
        self.tokenizer = model_io.load_tokenizer(folder)  # before the weights: a missing tokenizer file fails fast
        self.model = model_io.load_model(folder, dtype=resolve_dtype(cfg.model.dtype), device=device).train()
        self.model.gradient_checkpointing = cfg.train.gradient_checkpointing
        if lora:  # base frozen (requires_grad False): the optimizer below holds the adapters alone
            from dash.lora import apply_lora, load_adapter, trainable_fraction

            apply_lora(self.model, cfg.model.lora)
            if ckpt:
                try:  # e.g. an adapter for another base model: its error names the file and the tensor
                    load_adapter(self.model, ckpt / ADAPTER_DIR)
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"--resume: {exc}") from None
            self._say(f"LoRA: training {trainable_fraction(self.model):.3%} of the parameters")
        if fsdp and self.dist.enabled:  # one process: nothing to shard, only the checkpoint format differs
            shard_model(self.model, average_grads=cfg.loss.normalizer == "paper")
        # The KL reference is the initial policy; it is not even built when beta == 0.
        ref_folder = resolve_model_path(cfg.model.path)
        self.ref_model = None
        if cfg.loss.beta > 0 and lora:  # the base with adapters off: no second copy of the weights
            from dash.lora import BaseModelView

            self.ref_model = BaseModelView(self.model)
        elif cfg.loss.beta > 0:
            self.ref_model = frozen_copy(model_io.load_model(ref_folder, dtype=resolve_dtype(cfg.model.dtype),
                                                             device=device))
        self.train_data, self.test_examples = load_task(cfg.data, self.tokenizer,
                                                        self.model.config.max_position_embeddings, cfg.sampling)
        # Rank 0 alone evaluates: the other ranks load no eval set.
        self.eval_sets = (load_eval_sets(cfg, self.tokenizer, self.model, self.test_examples)
                          if self.dist.is_main else {})
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.update = PolicyUpdate(cfg, self.model, self.optimizer, self.scheduler, self.ref_model)
        self.selector = SampleSelector(cfg)  # the selection rule's state across steps (GRESO's)
        self.sampler = RolloutSampler(self.model, self.tokenizer, cfg.sampling, get_reward(cfg.data.reward),
                                      reward_timeout_s=cfg.data.reward_timeout_s)
        # Rank 0 alone logs, evaluates and checkpoints (the replicas are identical).
        purge = resumed_step + 1 if self.run_dir and ckpt else None  # TensorBoard: the old run's events from there on
        self.logger = MetricsLogger(cfg.log.out_dir, tensorboard=cfg.log.tensorboard, purge_step=purge,
                                    wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                                    run_config=config_to_dict(cfg)) if self.dist.is_main else None
        if ckpt:
            if fsdp:
                load_sharded(ckpt, self.model, self.optimizer)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.train_data.load_state_dict(state["data"])
            if "selection" in state:  # absent from checkpoints written before loss.selection existed
                self.selector.load_state_dict(state["selection"])
            set_rng_state(state["rng"])
            self.step = state["step"]
            self._say(f"resumed from {ckpt} at step {self.step}")
            changed = config_changes(state.get("config", {}), config_to_dict(cfg))
            if changed:  # allowed (e.g. more steps), but the run no longer continues the saved one exactly
                warnings.warn(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; the run "
                              "continues, but may differ from what the saved run would have done")
        # Set-up leaves ~440k long-lived Python objects (the tiny task's 100k examples, torch / transformers
        # internals); each automatic full collection scanned them all: ~160 ms, 3 times per 30 tiny-task DASH steps
        # (~16 ms a step, 10% of it). Frozen, they are skipped; a step's own garbage is still collected. close() thaws.
        gc.collect()
        gc.freeze()

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg = self.cfg
        cfg.check_for_training()  # e.g. greedy sampling: identical groups (`dash train` checks before set-up too)
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"{cfg.train.algorithm}", unit="step",
                   disable=self.quiet or not sys.stderr.isatty() or not self.dist.is_main)
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}", kept=f"{metrics['rollout/kept_frac']:.2f}")
            done = self.step == cfg.train.steps
            # Checkpoint first: an evaluation that fails cannot cost the steps since the last checkpoint.
            if (cfg.log.ckpt_every and self.step % cfg.log.ckpt_every == 0) or done:
                self.save_checkpoint()
            if (cfg.log.eval_every and self.step % cfg.log.eval_every == 0) or done:
                self.evaluate()
        bar.close()
        return self.history

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples = self.train_data.next_batch(cfg.train.prompts_per_step)
        metrics, rollout = run_step(cfg, self.sampler, self.update, examples, self.step, self.dist, self.selector)
        self.step += 1
        metrics["time/step_s"] = time.perf_counter() - t0
        if metrics["train/skipped_update"]:
            self._say(f"step {self.step}: non-finite gradient, update skipped")
        if self.logger and cfg.log.log_every and self.step % cfg.log.log_every == 0:
            self.logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})
        return metrics

    def evaluate(self) -> dict:
        """Every rank calls it (FSDP: the parameter gather is collective); rank 0 alone evaluates, others get {}."""
        self.model.eval()
        with torch.no_grad(), gathered(self.model):
            if self.dist.is_main:
                metrics, shown = evaluate_sets(self.eval_sets, self.cfg.eval, self.cfg.train.seed,
                                               samples_shown=self.cfg.log.samples_shown)
        self.model.train()
        if not self.dist.is_main:
            return {}
        if self.logger:
            self.logger.log(self.step, metrics)
            self.logger.log_samples(self.step, shown)
        self.history.append({"step": self.step, **metrics})
        self._say(f"step {self.step}: {headline(metrics)}")
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Every rank calls it: DDP writes on rank 0 only (replicas are identical), FSDP on all ranks (shards)."""
        state = {"scheduler": self.scheduler.state_dict(), "data": self.train_data.state_dict(),
                 "selection": self.selector.state_dict(),
                 "config": config_to_dict(self.cfg)}
        if self.cfg.train.parallel == "fsdp":
            path = save_sharded_checkpoint(self.cfg.log.out_dir, self.step, self.model, self.optimizer, state,
                                           self.dist)
        elif self.dist.is_main:
            state["optimizer"] = self.optimizer.state_dict()
            path = save_checkpoint(self.cfg.log.out_dir, self.step, self.model, self.tokenizer, state,
                                   base_model=str(resolve_model_path(self.cfg.model.path)))
        else:
            return None
        self._say(f"checkpoint {path}")
        return path

    def close(self, synchronize: bool = True) -> None:
        """Closes the logger and leaves the process group; synchronize=False after an error (see close_distributed)."""
        gc.unfreeze()  # cyclic garbage among the frozen objects becomes collectable again
        if getattr(self, "logger", None):
            self.logger.close()
        if getattr(self, "run_dir", None):
            self.run_dir.release()
        if hasattr(self, "dist"):
            close_distributed(self.dist, synchronize)

    def _say(self, msg: str) -> None:
        if not self.quiet and getattr(self, "dist", None) is not None and self.dist.is_main:
            tqdm.write(msg, file=sys.stderr)
