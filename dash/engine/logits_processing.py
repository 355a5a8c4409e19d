"""Logit processing and sampling with per-request seeds; the same processing recomputes log-probs for training.

Processing order (HF `generate` / vLLM): temperature, then top-k, then top-p on the top-k-renormalised distribution;
before `min_new_tokens` the stop tokens are masked. The sampler runs all of it inside one fused op
(`dash_kernels.sample_rows.sample_rows`: C++ on CPU, Triton on CUDA); `process_logits` here is its torch reference, used
to recompute log-probs for training. The log-prob returned for a sampled token is taken from this
processed distribution (vLLM's "processed_logprobs"), i.e. the old_logp the loss needs. Greedy rows (temperature 0)
report the log-prob under the same processing at temperature 1 (a point mass would always say 0).

Randomness: one uniform per (sequence, step) from a counter-based hash of (request seed, sample index, step), then
inverse-CDF sampling. A token therefore depends only on its own row's probabilities and its own key, never on the
batch it shares a step with, on eviction, or on torch's global RNG state; and no per-row torch.Generator is needed.
The hash works in 32-bit lanes of uint64 arrays so every product stays below 2**64 (no wraparound).
"""

from __future__ import annotations

import numpy as np
import torch

from dash_kernels import token_logprobs
from dash_kernels.sample_rows import mask_stop_tokens, processed_logp_ref

__all__ = ["stream_keys", "uniforms_at", "uniforms", "process_logits", "completion_logprobs"]

_MASK32 = np.uint64(0xFFFFFFFF)
_MIX_MUL = np.uint64(0x45D9F3B)  # < 2**27: a 32-bit lane times this stays far below 2**64 (no wraparound)
_SHIFT16 = np.uint64(16)
_STEP_SALT = np.uint64(0x9E3779B9)  # golden-ratio constant so step 0 and sample 0 do not hash like seed alone
_INV_2_32 = 1.0 / 2**32


def _mix(x: np.ndarray) -> np.ndarray:
    """An avalanche hash of 32-bit values held in uint64 (x in [0, 2**32))."""
    x = (((x >> _SHIFT16) ^ x) * _MIX_MUL) & _MASK32
    x = (((x >> _SHIFT16) ^ x) * _MIX_MUL) & _MASK32
    return (x >> _SHIFT16) ^ x


def stream_keys(seed: torch.Tensor, sample: torch.Tensor) -> np.ndarray:
    """[B] uint64 key of each row's sampling stream, a pure function of its (seed, sample index) int64 pair.

    The part of `uniforms` that does not change from step to step: the sampler computes it once per batch.
    """
    seed_u = seed.numpy().astype(np.uint64)  # two's complement for negative seeds: still a fixed function
    h = _mix(seed_u & _MASK32)
    h = _mix(h ^ ((seed_u >> np.uint64(32)) & _MASK32))
    return _mix(h ^ (sample.numpy().astype(np.uint64) & _MASK32))


def uniforms_at(keys: np.ndarray, step: torch.Tensor) -> torch.Tensor:
    """[B] float64 in (0, 1) for stream keys [B] (from `stream_keys`) at step [B] int64."""
    h = _mix(keys ^ ((step.numpy().astype(np.uint64) + _STEP_SALT) & _MASK32))
    return torch.from_numpy((h.astype(np.float64) + 0.5) * _INV_2_32)


def uniforms(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] float64 in (0, 1), a pure function of each row's (seed, sample index, step) int64 triple.

    In numpy: ~30 elementwise ops on a few hundred values cost microseconds there, ~10x less than torch dispatch.
    """
    return uniforms_at(stream_keys(seed, sample), step)


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs of the processed distribution, -inf on removed tokens (`dash_kernels.sample_rows.processed_logp_ref`,
    the reference of the fused samplers: top-k keeps ties at the k-th value, top-p keeps whole tied groups).

    Args:
        logits: (B, V) fp32 (after `mask_stop_tokens`).
        temperature: (B,) fp32, 0 = greedy (processed at temperature 1); top_k: (B,) long, 0 = off;
        top_p: (B,) fp32 in (0, 1].
    Returns:
        (B, V) fp32 log-probs.
    """
    return processed_logp_ref(logits, temperature, top_k, top_p)


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], params) -> list[torch.Tensor]:
    """Recompute the processed log-prob of every completion token with the training forward (`forward_packed`).

    `params`: one SamplingParams per completion (its temperature / top-k / top-p / min_new_tokens / stop ids, the
    latter already resolved to a list). Returns one (len(completion),) fp32 tensor per completion. With temperature
    alone (no top-k / top-p / min-tokens mask) it uses `dash_kernels.token_logprobs`, the trainer's fused kernel.
    """
    dev = next(model.parameters()).device  # every index / parameter tensor below is built on the model's device
    seqs = [p + c for p, c in zip(prompts, completions)]
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()]).to(dev)
    # Hidden state at position i predicts token i + 1: the completion's predictors start at the prompt's last token.
    rows = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(c)) + int(cu[i])
                      for i, (p, c) in enumerate(zip(prompts, completions))]).to(dev)
    targets = torch.tensor([t for c in completions for t in c], device=dev)
    sizes = [len(c) for c in completions]
    with torch.no_grad():
        hidden = model.forward_packed(ids, cu.to(dev), positions)[rows]  # [C, H]
        temps = {p.temperature for p in params}
        plain = all(p.top_k == 0 and p.top_p == 1.0 and p.min_new_tokens == 0 for p in params)
        if plain and len(temps) == 1 and min(temps) > 0:
            # Temperature only: the training kernel (lm_head fused with the log-softmax, no [C, V] logits) is exact.
            logp = token_logprobs(hidden, model.lm_head_weight, targets, temperature=temps.pop())
            return list(logp.float().split(sizes))
        logits = model.compute_logits_fp32(hidden)  # [C, V]
    per_tok = [(p, i) for p, c in zip(params, completions) for i in range(len(c))]
    step = torch.tensor([i for _, i in per_tok], device=dev)
    temp = torch.tensor([p.temperature for p, _ in per_tok], dtype=torch.float32, device=dev)
    top_k = torch.tensor([p.top_k for p, _ in per_tok], device=dev)
    top_p = torch.tensor([p.top_p for p, _ in per_tok], dtype=torch.float32, device=dev)
    width = max(1, max(len(p.stop_token_ids or []) for p, _ in per_tok))
    stop = torch.tensor([(p.stop_token_ids or []) + [-1] * (width - len(p.stop_token_ids or [])) for p, _ in per_tok],
                        device=dev)
    min_new = torch.tensor([p.min_new_tokens for p, _ in per_tok], device=dev)
    logits = mask_stop_tokens(logits, stop, step < min_new)
    logp = process_logits(logits, temp, top_k, top_p).gather(1, targets[:, None]).squeeze(1)
    return list(logp.split(sizes))
