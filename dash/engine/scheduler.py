"""Continuous batching: every step admits waiting sequences (a prefill step) or advances all running ones by one
token (a decode step); finished sequences leave at once and free their pages.

Policy (nano-vllm's prefill-first, plus group fork and eviction by recompute):
- Waiting entries are FIFO. A fresh entry is a whole group (the n samples of one prompt): its prompt is prefilled once
  and the allocator forks it into n sequences sharing the prompt's pages; each sample then draws its own first token
  from the shared last-position logits. An evicted sequence comes back alone, in front, and recomputes prompt +
  generated tokens (its sampling keys do not change, so neither do its tokens).
- Prefix caching (`prefix_caching`): the allocator names every full page a prefill writes by its chained token hash,
  so a later entry whose prompt starts with the same full pages (a shared system prompt or template, a repeated
  prompt, an evicted sample's own prompt while its siblings still hold it) reuses them and prefills only the rest;
  that step's attention then reads the prefix from the pages (`Context.page_table` set on a prefill). The cache lives
  as long as the call's KV pool: the next call may run on updated weights, so nothing is reused across calls.
- `prefill_prefers_pages` (the runner's choice: on fp32 CPU, where the C++ paged kernel serves query runs, it is
  `dash_kernels.paged_attention.cpu_prefill_prefers_pages`): a prefill without a hit also reads its attention from
  the pages when this predicate on its query-run lengths expects that kernel to beat varlen attention over the fresh
  K/V (short or ragged runs). The scheduler holds no kernel knowledge of its own.
- Admission needs the entry's pages plus one page of headroom per sequence when anything else is running, so a step
  that admits is not immediately undone by eviction.
- Decode: if the step's new pages (page boundaries + copy-on-write) exceed the free pages, the newest running
  sequences are evicted (pages freed, recomputed when readmitted) until it fits. The pool always fits one longest
  sequence (checked in `generate`), so the oldest sequence always progresses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dash.engine.kv_cache import Context, KVCache
from dash.engine.sequence import SequenceTable


class Scheduler:
    def __init__(self, table: SequenceTable, cache: KVCache, max_num_seqs: int, max_batched_tokens: int,
                 tokenizer=None, group_fork: bool = True, prefix_caching: bool = True,
                 prefill_prefers_pages: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.table, self.cache, self.alloc = table, cache, cache.allocator
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.tokenizer = tokenizer
        self.prefix_caching, self.prefill_prefers_pages = prefix_caching, prefill_prefers_pages
        n = table.n
        groups = [list(range(r * n, (r + 1) * n)) for r in range(len(table.prompts))]
        # Without group fork every sample is its own entry and prefills the prompt again (the baseline to beat).
        self.waiting: deque[list[int]] = deque(groups if group_fork else ([s] for g in groups for s in g))
        self.running: list[int] = []
        self._running_ids: torch.Tensor | None = None  # cached tensor of `running`, rebuilt when it changes
        self.num_evictions = 0
        self.num_finished = 0
        self.num_cached_tokens = 0  # prefill tokens served from the prefix cache

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def running_ids(self) -> torch.Tensor:
        if self._running_ids is None:
            self._running_ids = torch.tensor(self.running, dtype=torch.long)
        return self._running_ids

    def schedule(self) -> tuple[Context, torch.Tensor, torch.Tensor | None]:
        """Plan the next step. Returns (context, seq_ids [R] that sample, logits row [R] each samples from).

        The rows are None for a decode step: there sequence i samples from row i (no gather needed).
        """
        if self.waiting:
            planned = self._schedule_prefill()
            if planned is not None:
                return planned
        return self._schedule_decode()

    def _schedule_prefill(self):
        entries, seqs, num_tokens = [], [], 0
        free = self.alloc.num_free_pages
        while self.waiting:
            entry = self.waiting[0]
            tokens = self.table.full_tokens(entry[0])
            need = self.alloc.pages_for(len(tokens))
            busy = bool(self.running or entries)
            if busy and (len(self.running) + len(seqs) + len(entry) > self.max_num_seqs
                         or num_tokens + len(tokens) > self.max_batched_tokens
                         or need + len(self.running) + len(seqs) + len(entry) > free):
                break
            if need > free:
                break
            self.waiting.popleft()
            entries.append((entry, tokens))
            seqs += entry
            num_tokens += len(tokens)
            free -= need
        if not entries:
            return None
        lens = torch.tensor([len(t) for _, t in entries], dtype=torch.long)  # [E]
        firsts = torch.tensor([e[0] for e, _ in entries], dtype=torch.long)  # [E] the sequence that is prefilled
        tokens = torch.tensor([t for _, toks in entries for t in toks], dtype=torch.long)  # [sum(lens)]
        if self.prefix_caching:
            slots, cached = self.alloc.allocate_cached(firsts, tokens, lens)
        else:
            slots, cached = self.alloc.allocate(firsts, lens), torch.zeros_like(lens)
        for entry, _ in entries:
            if len(entry) > 1:  # group fork: the other samples share the prompt's pages
                self.alloc.fork(entry[0], torch.tensor(entry[1:], dtype=torch.long))
        ctx = self._prefill_context(tokens, lens, slots, cached, firsts)
        row_of = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor([len(e) for e, _ in entries]))
        self.running += seqs
        self._running_ids = None
        return ctx, torch.tensor(seqs, dtype=torch.long), row_of

    def _prefill_context(self, tokens, lens, slots, cached, firsts) -> Context:
        """Entry e computes tokens [cached[e], lens[e]); with no cache hit in the step (cached all 0) attention runs
        over the fresh K/V (varlen), otherwise it reads each entry's first cached[e] tokens from the pages. With
        `prefill_prefers_pages`, a step whose run lengths favour the paged kernel also carries page tables."""
        hit = bool(cached.any())
        q_lens = lens - cached  # [E] >= 1: the allocator always leaves the last token to compute
        paged = hit or (self.prefill_prefers_pages is not None and self.prefill_prefers_pages(q_lens))
        self.num_cached_tokens += int(cached.sum())
        positions = torch.arange(len(tokens)) - (lens.cumsum(0) - lens).repeat_interleave(lens)  # [sum(lens)] in entry
        if hit:  # keep the tokens the step computes
            keep = positions >= cached.repeat_interleave(lens)
            tokens, positions = tokens[keep], positions[keep]  # [T]
        ends = q_lens.cumsum(0)  # [E]
        return Context(
            is_prefill=True,
            input_ids=tokens,  # [T]
            positions=positions,  # [T] absolute position in its entry
            slot_mapping=slots,
            cu_seqlens=F.pad(ends, (1, 0)).to(torch.int32),  # [E+1] offsets of the computed tokens
            max_seqlen=int(q_lens.max()),
            logits_index=ends - 1,  # [E] last token of each entry
            page_table=self.alloc.page_tables(firsts) if paged else None,  # [E, W]
            context_lens=lens.to(torch.int32) if paged else None,  # [E] cached + computed
        )

    def _schedule_decode(self):
        ids = self.running_ids()
        while self.alloc.pages_needed_for_append(ids) > self.alloc.num_free_pages:
            self._evict_newest()
            ids = self.running_ids()
        slots, page_table, context_lens, src, dst = self.alloc.append(ids)
        t = self.table
        ctx = Context(
            is_prefill=False,
            input_ids=t.tokens[ids, t.num_gen[ids] - 1],  # [B] the last sampled token of each sequence
            positions=context_lens.long() - 1,  # [B]
            slot_mapping=slots,
            page_table=page_table,
            context_lens=context_lens,
            cow_src=src,
            cow_dst=dst,
        )
        return ctx, ids, None

    def _evict_newest(self) -> None:
        victim = self.running.pop()
        self._running_ids = None
        self.alloc.free(torch.tensor([victim], dtype=torch.long))
        self.waiting.appendleft([victim])
        self.num_evictions += 1

    def postprocess(self, seq_ids: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> int:
        """Record the sampled tokens, retire finished sequences; returns how many finished this step."""
        done = self.table.record(seq_ids, tokens, logprobs)  # [R]
        if self.table.has_stop_strings:
            done = self._check_stop_strings(seq_ids, done)
        if not bool(done.any()):
            return 0
        finished = seq_ids[done]
        self.alloc.free(finished)
        gone = set(finished.tolist())
        self.running = [s for s in self.running if s not in gone]
        self._running_ids = None
        self.num_finished += len(gone)
        return len(gone)

    def _check_stop_strings(self, seq_ids: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Python slow path, only for requests with stop strings: decode and search the completion text."""
        t = self.table
        done = done.clone()
        for i, s in enumerate(seq_ids.tolist()):
            stops = t.stop_strings[s // t.n]
            if not stops or (bool(done[i]) and t.finish_reason[s] == "stop"):
                continue
            text = self.tokenizer.decode(t.tokens[s, : int(t.num_gen[s])].tolist())
            hits = [text.find(stop) for stop in stops if stop in text]
            if hits:
                t.stop_text_cut[s] = min(hits)
                t.finish_reason[s] = "stop"
                done[i] = True
        return done
