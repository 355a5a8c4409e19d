"""Supervised fine-tuning: the masked-loss step every SFT in dash runs, the tiny task's loop, and greedy evaluation.

Purpose: one SFT step (`sft_step`) shared by the built-in task's warm start (`run_sft`, called by
`python -m dash.rl.warmstart` and `dash sft` on data.task=arith) and `dash sft` on your own data
(dash/rl/sft_train.py, with checkpoints and resume). Pack a batch end to end (dash/rl/sft_data.py), run the engine's
packed forward (`model.forward_packed`, no padding), take the log-probs of the solution tokens with the fused kernel
(dash_kernels.token_logprobs: the lm_head GEMM and log-softmax in one pass, no [N, V] logits held), AdamW step.

    loss = -(1 / N) * sum over the step's solution tokens t of log p(y_t | y_<t)      (N: solution tokens of the step)

Every solution token weighs the same whatever its sequence's length, and a step split into micro-batches
(`sft.token_budget`) divides by the whole step's N, so it makes the same update as one micro-batch (up to float
summation order). Prompt tokens carry no loss.

Design limits:
- Deterministic given the seed and the model's initial weights: `run_sft` draws batches from a private
  `torch.Generator`, the model has no dropout, and nothing reads the global RNG. Bitwise equality also assumes the
  same thread count. The fused kernel's CPU path (a chunked torch sweep) is deterministic too.
- `greedy_decode` re-runs the padded `forward` on the whole sequence at every step (no KV cache). That is
  O(new_tokens * length^2) but trivial for the tiny task's ~15-token sequences; the paged sampler replaces it at
  scale. Ragged prompts are left-padded so every row's next token sits in the last column.

Departures from the paper: the paper's SFT comparison (SFT-H) fine-tunes Qwen2.5-0.5B on MATH solutions; the tiny
task runs the same objective on arithmetic, and `dash sft` runs it on any model and file (docs/sft.md).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dash.model import CausalLM
from dash.rl.optim import LR_SCHEDULES, gradient_tensors, lr_factor
from dash.rl.sft_data import PackedSFTBatch, pack_sft_ids, tokenize_pairs
from dash.tasks.arith import arith_reward
from dash_kernels import token_logprobs

__all__ = ["PackedSFTBatch", "pack_sft_batch", "sft_loss", "sft_step", "lr_scheduler", "run_sft", "greedy_decode",
           "greedy_accuracy"]

# Prompts decoded per forward in greedy_decode: bounds the [B, L, V] logits buffer, large enough to amortise the
# per-call overhead on CPU (decode steps cost ~1 ms whatever the batch up to a few hundred rows).
_DECODE_BATCH = 256


def pack_sft_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> PackedSFTBatch:
    """Tokenize (as RL does: dash/rl/sft_data.tokenize_pairs, EOS appended unless the completion ends with it) and
    pack (prompt, completion) pairs; see PackedSFTBatch for the layout."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"need equal, non-zero numbers of prompts and completions, got {len(prompts)}/{len(completions)}"
        )
    return pack_sft_ids(tokenize_pairs(tokenizer, prompts, completions, append_eos=True))


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters; the CPU for a parameterless stand-in (the tests' oracle models)."""
    return next(model.parameters(), torch.empty(0)).device


def sft_loss(model: CausalLM, batch: PackedSFTBatch, normalizer: int | None = None) -> tuple[torch.Tensor, int]:
    """-sum of the solution tokens' log-probs / `normalizer` (default: this batch's solution tokens)
    -> (loss, number of solution tokens in `batch`)."""
    batch = batch.to(_device_of(model))  # built on the CPU by pack_sft_ids
    hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.positions)  # [T, H]
    rows = batch.loss_mask.nonzero().squeeze(1)  # [N] positions predicting a solution token
    logp = token_logprobs(hidden[rows], model.lm_head_weight, batch.targets[rows])  # [N] fp32, no [N, V] logits
    n_tokens = rows.numel()
    # Denominator: the step's solution tokens, so the loss reads as nats per solution token.
    return -logp.sum() / (normalizer or n_tokens), n_tokens


def sft_step(model: CausalLM, optimizer, scheduler, batches: Sequence[PackedSFTBatch], grad_clip: float) -> dict:
    """One optimizer step on the micro-batches of one step (loss normalised by all their solution tokens): backward
    each, clip, step the optimizer and the lr scheduler. A non-finite loss or gradient skips the update (reported).

    Returns detached metrics: train/loss, train/grad_norm, train/lr (the lr this step used), train/tokens,
    train/skipped_update.
    """
    total = sum(int(b.loss_mask.sum()) for b in batches)
    if total == 0:
        raise ValueError("sft_step: the step's batches hold no solution token")
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in batches:
        loss, _ = sft_loss(model, batch, total)
        loss.backward()
        loss_sum += loss.item()
    params = [p for p in gradient_tensors(optimizer, model) if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    skipped = not (math.isfinite(norm) and math.isfinite(loss_sum))
    lr = scheduler.get_last_lr()[0]
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped update still advances the schedule; torch warns about that
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return {"train/loss": loss_sum, "train/grad_norm": norm, "train/lr": lr, "train/tokens": float(total),
            "train/skipped_update": float(skipped)}


def lr_scheduler(optimizer, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    """torch LambdaLR over RL's lr_factor (dash/rl/optim.py: warm-up, then constant / linear / cosine); its state is
    saved in checkpoints, so a resume continues the schedule."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, steps, warmup_steps, schedule, min_lr_ratio))


def run_sft(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 50,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.1,
    on_log: Callable[[int, dict], None] | None = None,
) -> dict:
    """Fine-tune `model` in place on `train_examples` (objects with `.prompt` and `.solution` strings), in memory.

    Each step draws `batch_size` examples (a fresh permutation per epoch, from a generator seeded with `seed`),
    packs them, and takes one `sft_step`. `schedule` is "constant", "linear" or "cosine" (decay to
    `min_lr_ratio * lr` after `warmup_steps` of linear warmup). `grad_clip` <= 0 disables clipping.
    `on_log(step, metrics)` is called every `log_every` steps and at the end. No checkpoints: `dash sft` on a file
    (dash/rl/sft_train.py) has them.

    Returns a dict: `losses` (per-step loss list), `final_loss` (mean of the last `log_every` steps), `steps`,
    `tokens` (solution tokens trained on), `wall_time_s`, `cpu_time_s` (process CPU time, all threads),
    `steps_per_s`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"run_sft: schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if steps < 1 or not 1 <= batch_size <= len(train_examples):
        raise ValueError(
            f"run_sft: need steps >= 1 and 1 <= batch_size <= len(train_examples), got steps={steps}, "
            f"batch_size={batch_size}, {len(train_examples)} examples"
        )
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    sched = lr_scheduler(opt, steps, warmup_steps, schedule, min_lr_ratio)
    model.train()

    order = torch.randperm(len(train_examples), generator=gen).tolist()
    cursor, losses, tokens = 0, [], 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="sft", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for step in bar:
        if cursor + batch_size > len(order):  # new epoch: reshuffle; the tail of the old order is dropped
            order, cursor = torch.randperm(len(train_examples), generator=gen).tolist(), 0
        batch_ex = [train_examples[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        batch = pack_sft_batch(tokenizer, [e.prompt for e in batch_ex], [e.solution for e in batch_ex])
        out = sft_step(model, opt, sched, [batch], grad_clip)

        losses.append(out["train/loss"])
        tokens += int(out["train/tokens"])
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (log_every and (step + 1) % log_every == 0) or step + 1 == steps:
            window = losses[-log_every:] if log_every else losses[-1:]
            metrics = {"train/loss": sum(window) / len(window), "train/lr": out["train/lr"],
                       "train/grad_norm": out["train/grad_norm"], "time/elapsed_s": time.perf_counter() - t0}
            if on_log is not None:
                on_log(step + 1, metrics)
            else:
                tqdm.write(
                    f"sft step {step + 1}/{steps} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
                    f"grad_norm {metrics['train/grad_norm']:.3f} elapsed {metrics['time/elapsed_s']:.1f}s"
                )
    bar.close()
    wall = time.perf_counter() - t0
    # CPU seconds of this process (all threads): on a shared machine wall time is inflated, this much less so.
    cpu = time.process_time() - cpu0
    window = losses[-log_every:] if log_every else losses[-1:]
    return {
        "losses": losses,
        "final_loss": sum(window) / len(window),
        "steps": steps,
        "tokens": tokens,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "steps_per_s": steps / wall,
    }


@torch.inference_mode()
def greedy_decode(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy completions of `prompts`, decoded with special tokens kept and cut after the first EOS.

    Returns one string per prompt, e.g. "553<eos>" (or the raw `max_new_tokens` tokens if no EOS came).
    """
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), _DECODE_BATCH):
        enc = tokenizer(list(prompts[start : start + _DECODE_BATCH]), add_special_tokens=False)["input_ids"]
        width = max(len(p) for p in enc)
        # Left padding puts every row's last prompt token in the last column; RoPE only sees position differences,
        # so shifting a row right by its pad count does not change its attention scores.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in enc], dtype=torch.long, device=dev)  # [B, L]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in enc], dtype=torch.long,
                            device=dev)  # [B, L]
        ragged = bool((mask == 0).any())
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)  # [B]
        for _ in range(max_new_tokens):
            logits = model.forward(ids, attention_mask=mask if ragged else None)  # [B, L, V]
            nxt = logits[:, -1, :].argmax(dim=-1)  # [B]
            # Rows that already ended keep receiving tokens; they are cut at their first EOS below.
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        for row in ids[:, width:].tolist():
            cut = row[: row.index(eos_id) + 1] if eos_id in row else row
            out.append(tokenizer.decode(cut, skip_special_tokens=False))
    model.train(was_training)
    return out


def greedy_accuracy(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence,
    max_new_tokens: int,
    reward_fn: Callable[[str, str], float] | None = None,
) -> float:
    """Mean reward of greedy completions on `examples` (objects with `.prompt` and `.answer`).

    `reward_fn(completion_text, answer)` defaults to the arithmetic task's exact-answer reward.
    """
    if reward_fn is None:
        reward_fn = arith_reward
    if not examples:
        return 0.0
    completions = greedy_decode(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    return sum(reward_fn(c, e.answer) for c, e in zip(completions, examples, strict=True)) / len(examples)
