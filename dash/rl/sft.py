"""Supervised fine-tuning on (prompt, completion) pairs, and greedy evaluation.

Purpose: the warm start of the tiny task (`python -m dash.tasks.warmstart`) and the building block of the later
`dash sft` recipe. The loop is explicit: sample a batch, pack it, forward, masked cross-entropy, AdamW step.

Design limits:
- Training uses the engine's packed path (`model.forward_packed`): sequences are laid end to end with no padding,
  and logits are computed only at the positions whose next token is a completion token (prompt tokens are masked,
  and the vocabulary is tiny, so plain `compute_logits` + cross-entropy is fine here; large vocabularies belong to
  `dash_kernels`).
- Loss = mean over all completion tokens of the batch (every token weighs the same, whatever its sequence length).
- Deterministic given `seed` and the model's initial weights: batches come from a private `torch.Generator`, the
  model has no dropout, and nothing reads the global RNG. Bitwise equality also assumes the same thread count.
- `greedy_decode` re-runs the padded `forward` on the whole sequence at every step (no KV cache). That is
  O(new_tokens * length^2) but trivial for the tiny task's ~15-token sequences; the paged sampler replaces it at
  scale. Ragged prompts are left-padded so every row's next token sits in the last column.

Departures from the paper: the paper's SFT comparison fine-tunes Qwen2.5-0.5B on MATH solutions; this is the same
objective on the tiny task.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dash.model import CausalLM

# Prompts decoded per forward in greedy_decode: bounds the [B, L, V] logits buffer, large enough to amortise the
# per-call overhead on CPU (VERIFIED.md: decode steps cost ~1 ms whatever the batch up to a few hundred rows).
_DECODE_BATCH = 256


@dataclass(frozen=True, slots=True)
class PackedSFTBatch:
    """Sequences (prompt + completion) packed end to end.

    Attributes:
        input_ids: [T] int64 token ids of all sequences, concatenated.
        cu_seqlens: [B+1] int32 start offsets of each sequence; cu_seqlens[-1] == T.
        positions: [T] int64 position of each token inside its own sequence.
        targets: [T] int64 the next token within the same sequence (0 where there is none).
        loss_mask: [T] bool True where the target is a completion token, i.e. where the loss applies.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> PackedSFTBatch:
        return PackedSFTBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack_sft_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> PackedSFTBatch:
    """Tokenize and pack (prompt, completion) pairs; see PackedSFTBatch for the layout."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"need equal, non-zero numbers of prompts and completions, got {len(prompts)}/{len(completions)}"
        )
    # No specials are added: a prompt is its characters and the completion carries its own EOS.
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    ids, pos, tgt, mask, cu = [], [], [], [], [0]
    for p, c in zip(p_ids, c_ids, strict=True):
        seq = p + c
        n = len(seq)
        ids += seq
        pos += range(n)
        # Position t predicts seq[t+1]; it counts iff seq[t+1] is a completion token (t + 1 >= len(p)).
        tgt += seq[1:] + [0]
        mask += [t + 1 >= len(p) and t + 1 < n for t in range(n)]
        cu.append(cu[-1] + n)
    return PackedSFTBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        positions=torch.tensor(pos, dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
        loss_mask=torch.tensor(mask, dtype=torch.bool),
    )


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters; the CPU for a parameterless stand-in (the tests' oracle models)."""
    return next(model.parameters(), torch.empty(0)).device


def sft_loss(model: CausalLM, batch: PackedSFTBatch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the completion tokens of `batch` -> (loss, number of completion tokens)."""
    batch = batch.to(_device_of(model))  # built on the CPU by pack_sft_batch
    hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.positions)  # [T, H]
    logits = model.compute_logits(hidden[batch.loss_mask])  # [N, V], N = completion tokens
    n_tokens = int(batch.loss_mask.sum())
    # Denominator: completion tokens of this batch, so the loss reads as nats per answer token.
    loss = F.cross_entropy(logits.float(), batch.targets[batch.loss_mask], reduction="sum") / n_tokens
    return loss, n_tokens


def _lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    """Fine-tune `model` in place on `train_examples` (objects with `.prompt` and `.solution` strings).

    Each step draws `batch_size` examples (a fresh permutation per epoch, from a generator seeded with `seed`),
    packs them, and takes one AdamW step on the masked cross-entropy. `schedule` is "constant" or "cosine" (decay
    to `min_lr_ratio * lr` after `warmup_steps` of linear warmup). `grad_clip` <= 0 disables clipping.
    `on_log(step, metrics)` is called every `log_every` steps and at the end.

    Returns a dict: `losses` (per-step loss list), `final_loss` (mean of the last `log_every` steps), `steps`,
    `tokens` (completion tokens trained on), `wall_time_s`, `cpu_time_s` (process CPU time, all threads),
    `steps_per_s`.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"run_sft: schedule must be 'constant' or 'cosine', got {schedule!r}")
    if steps < 1 or not 1 <= batch_size <= len(train_examples):
        raise ValueError(
            f"run_sft: need steps >= 1 and 1 <= batch_size <= len(train_examples), got steps={steps}, "
            f"batch_size={batch_size}, {len(train_examples)} examples"
        )
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
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

        cur_lr = lr * _lr_factor(step, steps, warmup_steps, schedule, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        loss, n_tok = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        opt.step()

        losses.append(loss.item())
        tokens += n_tok
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (log_every and (step + 1) % log_every == 0) or step + 1 == steps:
            window = losses[-log_every:] if log_every else losses[-1:]
            metrics = {
                "train/loss": sum(window) / len(window),
                "train/lr": cur_lr,
                "train/grad_norm": float(grad_norm),
                "time/elapsed_s": time.perf_counter() - t0,
            }
            if on_log is not None:
                on_log(step + 1, metrics)
            else:
                tqdm.write(
                    f"sft step {step + 1}/{steps} loss {metrics['train/loss']:.4f} lr {cur_lr:.2e} "
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
        from dash.tasks.arith import arith_reward as reward_fn
    if not examples:
        return 0.0
    completions = greedy_decode(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    return sum(reward_fn(c, e.answer) for c, e in zip(completions, examples, strict=True)) / len(examples)
