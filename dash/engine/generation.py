"""`generate`: the sampler's one public call. Paged KV cache, continuous batching, group fork, on the live model.

    from dash.engine import generate, SamplingParams
    outs = generate(model, tokenizer, ["12+34*56="] * 64, n=4, params=SamplingParams(temperature=0.9, seed=0))
    outs[i].prompt_token_ids; outs[i].completions[g] (also outs[i][g]): .token_ids / .text / .finish_reason / .logprobs

Full prompt pages are cached by content within the call (`prefix_caching`): prompts that share a system prompt or
template prefill it once. Nothing is reused across calls, because the next call may run on updated weights.
DASH's preemptive sampling calls this once per optimizer step for the whole step's batch (e.g. 64 prompts x G=4);
the model object is the trainer's, so the next call after `optimizer.step()` samples from the new weights.
All inputs are validated before any work (ValueError naming the request and the limit). Running out of pages
mid-call evicts sequences and recomputes them; every completion ends with finish_reason "stop" or "length", never
truncated silently. A tqdm bar counts finished sequences when stderr is a TTY (or `progress=True`).

Departures from the paper (which samples with vLLM on a separate copy of the weights): same model object, no sync;
per-token log-probs are the processed ones (see logits_processing.py), returned for the loss's old_logp.
Tests: `.venv/bin/python -m pytest tests/engine -q`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from dash.engine.kv_cache import KVCache
from dash.engine.runner import ModelRunner
from dash.engine.logits_processing import uniforms_at
from dash.engine.scheduler import Scheduler
from dash.engine.sequence import BatchRows, RequestOutput, SamplingParams, SequenceTable
from dash_kernels.sample_rows import sample_rows

DEFAULT_PAGE_SIZE = 16  # small pages waste little at short RL completions; the Triton kernel takes any size
DEFAULT_MAX_NUM_SEQS = 1024  # a DASH step is 256 completions; more only adds host work per step
DEFAULT_MAX_BATCHED_TOKENS = 16384  # prefill tokens per step: bounds the activation memory of one forward
# Default KV pool on CUDA: at most this share of the free device memory (weights and optimizer state are already
# allocated; the rest is left to the forward's activations). More pages than that are not needed: the scheduler
# evicts instead.
KV_MEMORY_FRACTION = 0.8


def generate(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], n: int = 1,
             params: SamplingParams | Sequence[SamplingParams] | None = None, *, page_size: int = DEFAULT_PAGE_SIZE,
             num_pages: int | None = 0, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
             max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS, group_fork: bool = True,
             prefix_caching: bool = True, progress: bool | None = None, stats: dict | None = None,
             cuda_graphs: bool = True) -> list[RequestOutput]:
    """Sample n completions for each prompt.

    Args:
        model: a `dash.model.CausalLM` (any device / dtype); used in place, never copied.
        tokenizer: encodes string prompts and decodes completions; may be None for token-id prompts (text is "").
        prompts: strings, or lists of token ids.
        n: samples per prompt (the GRPO group size G); the prompt is prefilled once and its pages shared.
        params: one SamplingParams for all prompts, or one per prompt.
        page_size, num_pages: KV pool geometry; num_pages 0 / None sizes the pool so nothing is ever evicted, capped
            on CUDA at KV_MEMORY_FRACTION of the free device memory (the scheduler then evicts).
        max_num_seqs, max_batched_tokens: per-step limits on running sequences and prefill tokens.
        group_fork: False prefills each of the n samples separately (for benchmarks and tests).
        prefix_caching: reuse the K/V of full prompt pages that an earlier prefill of this call computed for the same
            tokens (shared system prompts, repeated prompts); only within the call, whose weights cannot change.
        progress: tqdm bar; None -> only when stderr is a TTY.
        stats: if a dict is given, filled with step / page / eviction counts (graph_steps: decode steps run
            through the CUDA-graph buckets).
        cuda_graphs: on CUDA, replay decode steps of up to MAX_GRAPH_BATCH rows from per-batch-size CUDA graphs
            (dash/engine/cuda_graphs.py); False, prefill and CPU run every step eagerly. The same computation up to
            float rounding (padded GEMMs may sum in another order; docs/sampling.md).

    Returns:
        One RequestOutput per prompt (`.prompt_token_ids`, `.completions`; `out[i][g]` is completion g of prompt i).
    """
    ids, plist = _check_inputs(model, tokenizer, prompts, n, params, page_size, max_num_seqs, max_batched_tokens)
    cfg = model.config
    max_len = cfg.max_position_embeddings
    stop_default = _default_stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    table = SequenceTable(ids, plist, n, max_len, stop_default, device=device)
    pages_per_seq = [-(-(len(p) + int(m)) // page_size) for p, m in zip(ids, table.max_new[::n].tolist())]
    default_pool = not num_pages
    if default_pool:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # not run here: no GPU
        num_pages = default_num_pages(n * sum(pages_per_seq), KVCache.bytes_per_page(model, page_size), free)
    if num_pages < max(pages_per_seq):
        r = max(range(len(ids)), key=lambda i: pages_per_seq[i])
        limit = (f"the default pool ({KV_MEMORY_FRACTION:.0%} of free device memory) holds {num_pages} pages"
                 if default_pool else f"num_pages={num_pages} is too small")
        raise ValueError(f"{limit}: prompt {r} needs {pages_per_seq[r]} pages of {page_size} tokens for prompt + "
                         f"max_new_tokens = {len(ids[r]) + int(table.max_new[r * n])}")
    cache = KVCache(model, num_pages, page_size)
    runner = ModelRunner(model, cache, max_len, cuda_graphs=cuda_graphs,
                         max_batch=min(max_num_seqs, table.num_seqs), max_pages=max(pages_per_seq))
    sched = Scheduler(table, cache, max_num_seqs, max_batched_tokens, tokenizer, group_fork=group_fork,
                      prefix_caching=prefix_caching, prefill_prefers_pages=runner.prefill_prefers_pages)
    show = sys.stderr.isatty() if progress is None else progress
    steps = prefills = peak = 0
    with tqdm(total=table.num_seqs, desc="generate", unit="seq", disable=not show) as bar:
        try:
            while not sched.is_finished():
                ctx, seq_ids, rows = sched.schedule()
                peak = max(peak, num_pages - cache.allocator.num_free_pages)
                runner.prepare(ctx)  # captures the CUDA graph of a new decode bucket (synchronises, once each)
                logits = runner.run(ctx)  # [R, V] fp32 (R = T for a prefill, B for a decode step)
                if rows is not None:
                    logits = logits[rows.to(runner.device)]
                tokens, logprobs = _sample(table, table.rows(seq_ids), logits)
                bar.update(sched.postprocess(seq_ids, tokens.cpu(), logprobs.cpu()))
                steps += 1
                prefills += ctx.is_prefill
        finally:
            cache.recycle()
    if stats is not None:
        stats.update(steps=steps, prefill_steps=prefills, decode_steps=steps - prefills, num_pages=num_pages,
                     peak_pages=peak, evictions=sched.num_evictions,
                     generated_tokens=int(table.num_gen.sum()), prompt_tokens=sum(len(p) for p in ids) * n,
                     cached_prompt_tokens=sched.num_cached_tokens,
                     graph_steps=runner.graphs.replays if runner.graphs is not None else 0)
    return table.outputs(tokenizer)


def default_num_pages(needed: int, bytes_per_page: int, free_bytes: int | None) -> int:
    """Pages of the default KV pool: every page the call could use (nothing is ever evicted), capped on a device
    with `free_bytes` free at what fits in KV_MEMORY_FRACTION of them (>= 1; generate checks it holds one sequence)."""
    if free_bytes is None:
        return needed
    return max(1, min(needed, int(free_bytes * KV_MEMORY_FRACTION) // bytes_per_page))


def _sample(table: SequenceTable, batch: BatchRows, logits: torch.Tensor):
    """Process and sample one token per row of `batch`, in one fused op (C++ on CPU, Triton on CUDA) whatever the
    settings (temperature, top-k, top-p, min-tokens stop mask); the RNG key of a row is (its stream, its step)."""
    step = table.num_gen[batch.seq_ids]  # [R] index of the token being sampled
    u = uniforms_at(batch.keys, step).to(logits.device, non_blocking=True)  # [R] float64
    active = None if batch.min_new is None else (step < batch.min_new).to(logits.device, non_blocking=True)
    if not table.any_filter:
        return sample_rows(logits, batch.temperature, u, batch.device_stop_ids, active)
    return sample_rows(logits, batch.temperature, u, batch.device_stop_ids, active, batch.top_k, batch.top_p,
                       max_top_k=table.max_top_k)


def _default_stop_ids(model, tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _check_inputs(model, tokenizer, prompts, n, params, page_size, max_num_seqs, max_batched_tokens):
    """Every ValueError generate can raise, before any allocation or forward."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    for name, value in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                        ("max_batched_tokens", max_batched_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if params is None:
        params = SamplingParams()
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise ValueError(f"params: got {len(plist)} SamplingParams for {len(prompts)} prompts")
    cfg = model.config
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        sp.check(f"request {i}")
        if sp.stop and tokenizer is None:
            raise ValueError(f"request {i}: stop strings {sp.stop!r} need a tokenizer to decode the completions")
        if any(not 0 <= t < cfg.vocab_size for t in sp.stop_token_ids or []):
            raise ValueError(f"request {i}: stop_token_ids must be in [0, {cfg.vocab_size}), got {sp.stop_token_ids}")
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"request {i}: a string prompt needs a tokenizer")
            try:
                p = tokenizer.encode(p)
            except Exception:  # noqa: BLE001 -- tokenizers raises a bare Exception naming neither text nor character
                from dash.tokenizer import encode_problem

                raise ValueError(f"request {i}: {encode_problem(tokenizer, p)}") from None
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"request {i}: empty prompt (at least one token is needed to condition on)")
        if len(p) >= cfg.max_position_embeddings:
            raise ValueError(f"request {i}: prompt has {len(p)} tokens but the model's context is "
                             f"{cfg.max_position_embeddings} (prompt + at least one new token must fit)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"request {i}: token ids must be in [0, {cfg.vocab_size}), got {min(p)}..{max(p)}")
        ids.append(p)
    return ids, plist
