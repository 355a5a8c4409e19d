"""CUDA graphs for the sampler's decode step: capture the step once per batch-size bucket, then replay it.

Why: an eager decode step of a Qwen2.5-0.5B-shaped model is ~380 kernel launches issued one by one from Python, so at
small and medium batches the GPU waits on the host between kernels. A replayed `torch.cuda.CUDAGraph` is one launch
for the whole forward (vLLM and nano-vllm do the same for decode).

What is captured: the backbone of a decode step, from the token embedding through every decoder layer (K/V store,
paged attention, MLP) to the final RMSNorm: `ModelRunner.forward` on a Context of static buffers. Outside the graph
stay the copy-on-write page copies (before), the fp32 lm_head GEMM on the live rows and the sampling op `sample_rows`
(after): the logits are [B, V] fp32 (155 MB at batch 256 and V = 151936), a buffer the graph pool would otherwise hold
for the whole call, and sampling takes per-row settings that change every step.

Buckets: batch sizes 1, 2, 4, ... below the call's largest batch, then that batch itself (at most MAX_GRAPH_BATCH).
A step of B rows replays the smallest bucket n >= B: rows [B, n) are padding, with slot -1 (every store_kv kernel
skips it: a padding row writes no page at all) and a context of one key read from a valid page id (page tables hold
valid ids only). Rows never mix in any op of the forward (GEMMs, norms, attention are per row), so a padding row
cannot change a live row's value, only its rounding (a BLAS may order a row's sums by the row count). Static
inputs: token ids, positions, slots [N], context lengths [N], page tables [N, W] with W the call's largest page
count per sequence (so the split-K choice of paged attention, made from W on the host, is fixed per bucket).
Replay copies the step's inputs into the bucket's buffers (non-blocking host-to-device copies) and adds no host
sync.

Capture is lazy, per `generate` call (the KV pool, whose addresses a graph holds, lives for one call): the first
decode step of a bucket warms it up on padding rows only (compiles the Triton kernels, writes no page), then captures
it into one memory pool shared by the call's graphs. That costs two forwards and a device synchronisation
(torch.cuda.graph synchronises and empties the allocator cache) per bucket, in `ModelRunner.prepare`, outside the
step's no-sync window; everything is freed when the call ends.
Fallbacks to the eager step: prefill, a batch above the largest bucket, a page table wider than W, CPU, a CUDA run on
a backend other than Triton (its torch references sync), and `SamplingConfig.cuda_graphs = False`.
`force_eager_buckets` (tests) runs the same bucket path without capture on any device: on CPU it gives the eager
path's tokens, with log-probs and pages bitwise equal when a step fills its bucket and equal up to the GEMMs'
summation order when it is padded (docs/sampling.md). The capture and replay code has not run on a GPU (none was
available); its test is tests/gpu/test_gpu_cuda_graphs.py.
Departures from the paper: none (it samples with vLLM, which captures decode steps the same way).
Tests: `.venv/bin/python -m pytest tests/engine/test_cuda_graph_buckets.py -q`.
"""

from __future__ import annotations

import bisect
import weakref
from typing import TYPE_CHECKING

import torch

from dash.engine.kv_cache import Context
from dash_kernels import backend

if TYPE_CHECKING:  # the runner owns this object; imported for types only
    from dash.engine.runner import ModelRunner

# Largest batch that gets a graph (vLLM's and nano-vllm's default cap): above it the per-step launch overhead is
# small next to the step's own work, and the static buffers and pool would grow with it.
MAX_GRAPH_BATCH = 512
PAD_SLOT = -1  # store_kv's "store nowhere" slot (dash_kernels/kv.py)
PAD_CONTEXT = 1  # a padding row attends to one key (position 0 of its page-table row): finite, never an empty softmax

force_eager_buckets: bool = False
"""Tests: run decode steps through the bucket buffers without capturing, on any device (CPU included)."""


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Bucket sizes for batches up to `max_batch` (capped at MAX_GRAPH_BATCH): powers of two below it, then it."""
    top = min(max_batch, MAX_GRAPH_BATCH)
    if top < 1:
        raise ValueError(f"graph_buckets: max_batch must be >= 1, got {max_batch}")
    sizes, n = [], 1
    while n < top:
        sizes.append(n)
        n *= 2
    return (*sizes, top)


def use_decode_graphs(device: torch.device, enabled: bool) -> bool:
    """Whether a runner on `device` takes the bucket path: forced (tests), or enabled on CUDA with the Triton
    backend (the path whose decode step has no host sync, see tests/gpu/test_gpu_host_syncs.py)."""
    if force_eager_buckets:
        return True
    return enabled and device.type == "cuda" and backend.resolve(device) == "triton"


class DecodeGraphs:
    """The static buffers and graphs of one `generate` call's decode steps (see the module docstring).

    Args:
        runner: the call's ModelRunner (its `forward` is what is captured).
        max_batch: the call's largest decode batch (min(max_num_seqs, number of sequences)).
        max_pages: the call's largest page count per sequence (page table width W).
    """

    def __init__(self, runner: ModelRunner, max_batch: int, max_pages: int) -> None:
        if max_pages < 1:
            raise ValueError(f"DecodeGraphs: max_pages must be >= 1, got {max_pages}")
        # A weak reference: the runner owns this object, and a cycle would keep the call's KV pool and graph pool
        # alive past the call until the garbage collector ran.
        self._runner = weakref.ref(runner)
        self.device = runner.device
        self.buckets = graph_buckets(max_batch)
        self.max_pages = max_pages
        self.capture = self.device.type == "cuda" and not force_eager_buckets
        n, dev = self.buckets[-1], self.device
        # Filled as padding rows; a live step overwrites its first B rows (and page-table columns [0, W_step)).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.slot_mapping = torch.full((n,), PAD_SLOT, dtype=torch.int32, device=dev)  # [N]
        self.context_lens = torch.full((n,), PAD_CONTEXT, dtype=torch.int32, device=dev)  # [N]
        self.page_table = torch.zeros(n, max_pages, dtype=torch.int32, device=dev)  # [N, W] valid ids only
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, hidden [n, H])
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # decode steps served by the bucket path (graph replays, or forced eager runs)

    def bucket(self, ctx: Context) -> int | None:
        """The bucket that serves decode step `ctx`, or None: eager (too many rows, a page table wider than the
        buffers, or, when capturing, a bucket `prepare` has not captured)."""
        b = ctx.input_ids.shape[0]
        if b > self.buckets[-1] or ctx.page_table.shape[1] > self.max_pages:
            return None
        n = self.buckets[bisect.bisect_left(self.buckets, b)]
        return n if not self.capture or n in self.graphs else None

    def prepare(self, batch: int) -> None:
        """Capture the bucket of a `batch`-row decode step if it has no graph yet (CUDA only; synchronises)."""
        if not self.capture or batch > self.buckets[-1]:
            return
        n = self.buckets[bisect.bisect_left(self.buckets, batch)]
        if n in self.graphs:
            return
        with torch.cuda.device(self.device):
            # Warm-up on padding rows only (slot -1: no page is written) on a side stream, as torch's graph docs do:
            # compiles the Triton kernels for these shapes and lets cuBLAS set up before capture. The rows may hold
            # an earlier step's live rows, whose slots may since belong to another sequence: reset them first.
            self.slot_mapping[:n].fill_(PAD_SLOT)
            self.context_lens[:n].fill_(PAD_CONTEXT)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward_bucket(n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._forward_bucket(n)  # [n, H], allocated in the pool, kept alive with the graph
        self.graphs[n] = (graph, hidden)

    def forward(self, ctx: Context, n: int) -> torch.Tensor:
        """Decode step `ctx` (B rows) on bucket n = self.bucket(ctx): final-normed hidden states [B, H], a view of
        the bucket's output (valid until the next step). Copy-on-write is the caller's, before this call."""
        b, w = ctx.page_table.shape
        # Inputs into the bucket's first B rows: host-to-device copies that do not wait for the device.
        for dst, src in ((self.input_ids, ctx.input_ids), (self.positions, ctx.positions),
                         (self.slot_mapping, ctx.slot_mapping), (self.context_lens, ctx.context_lens)):
            dst[:b].copy_(src, non_blocking=True)
        self.page_table[:b, :w].copy_(ctx.page_table, non_blocking=True)  # columns >= w keep valid old ids
        if b < n:  # rows [b, n) may hold a live row of an earlier step: make them padding again
            self.slot_mapping[b:n].fill_(PAD_SLOT)
            self.context_lens[b:n].fill_(PAD_CONTEXT)
        self.replays += 1
        if not self.capture:
            return self._forward_bucket(n)[:b]
        graph, hidden = self.graphs[n]
        with torch.cuda.device(self.device):  # replay launches on the current device's stream
            graph.replay()
        return hidden[:b]

    def _forward_bucket(self, n: int) -> torch.Tensor:
        """The function the graph captures: the runner's decode forward over the first n rows of the buffers."""
        ctx = Context(is_prefill=False, input_ids=self.input_ids[:n], positions=self.positions[:n],
                      slot_mapping=self.slot_mapping[:n], page_table=self.page_table[:n],
                      context_lens=self.context_lens[:n])
        return self._runner().forward(ctx)  # [n, H]
