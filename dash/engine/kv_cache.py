"""The paged KV pool of one `generate` call and the per-step attention metadata (`Context`).

Memory: per layer one K and one V tensor `[num_pages, page_size, kv_heads, head_dim]` in the model's dtype and on its
device (the layout of `dash_kernels.kv` and `dash_kernels.paged_attention`). Pages are handed out by the C++
`dash_kernels._C.PageAllocator` (free list, ref counts, fork, copy-on-write), which also returns the step's int32
slot mappings and page tables, so no per-sequence Python runs on the hot path.

Sizing: by default the pool holds every sequence of the call at its longest (prompt + max_new_tokens), so nothing is
ever evicted; a smaller `num_pages` trades memory for recompute (eviction), never for a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dash_kernels import kv, require_c
from dash_kernels._ext import use_cpu_kernel


@dataclass(slots=True)
class Context:
    """Everything the runner needs for one forward step (prefill or decode).

    Attributes:
        is_prefill: prefill packs whole sequences (fresh K/V, varlen attention); decode feeds one token each.
        input_ids: (T,) long tokens to run; positions: (T,) long RoPE positions.
        slot_mapping: (T,) int32 cache slot of each token's K/V.
        cu_seqlens: (E+1,) int32 prefill offsets of the computed tokens; max_seqlen: longest such run (host int).
        logits_index: (E,) long rows of the hidden states whose logits are sampled (last token of each prefill).
        page_table: (B, W) int32 page tables (padded with page 0) of a decode step, or of a prefill that reuses cached
            prefix pages (None for a prefill that computes every token); context_lens: (B,) int32 tokens in the cache
            per sequence once the step's tokens are stored.
        cow_src, cow_dst: (n,) int32 pages to copy before the step (copy-on-write of shared partial pages).
    """

    is_prefill: bool
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    logits_index: torch.Tensor | None = None
    page_table: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    cow_src: torch.Tensor | None = None
    cow_dst: torch.Tensor | None = None

    def to(self, device: torch.device) -> Context:
        """Move the tensors to the model's device (no-op on CPU)."""
        if device.type == "cpu":
            return self
        fields = {name: getattr(self, name) for name in self.__slots__}
        return Context(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                          for k, v in fields.items()})


class KVCache:
    """Per-layer K/V page pools plus the page allocator that owns them."""

    def __init__(self, model, num_pages: int, page_size: int) -> None:
        cfg = model.config
        param = next(model.parameters())
        shape = (num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        layers = cfg.num_hidden_layers
        # Recycled only where attention is the C++ kernel (fp32 CPU), which reads no slot past a sequence's length:
        # a recycled page's stale K/V (non-finite after a diverged call) can never reach a result there.
        self._recycle = use_cpu_kernel(torch.empty(0, dtype=param.dtype, device=param.device))
        self._pool = _take_cpu_pool(shape, layers, param.dtype) if self._recycle else None
        if self._pool is None:
            # Zeros, not empty: the CPU path gathers whole pages and masks the unused slots in SDPA, and a masked
            # NaN from uninitialised memory would still poison the output (0 * NaN). Freed pages keep finite old
            # values (so does a recycled pool).
            self._pool = tuple([torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(layers)]
                               for _ in range(2))
        self.k = [t[:num_pages] for t in self._pool[0]]  # [num_pages, page_size, Hkv, D] per layer
        self.v = [t[:num_pages] for t in self._pool[1]]
        self.allocator = require_c().PageAllocator(num_pages, page_size)
        self.page_size = page_size
        self.num_pages = num_pages

    def recycle(self) -> None:
        """End of the call: a CPU pool is kept for the next call (see _CPU_POOLS); the cache is unusable after."""
        if self._pool is not None and self._recycle:
            _CPU_POOLS[:] = [self._pool]
        self._pool = None
        self.k = self.v = []

    @staticmethod
    def bytes_per_page(model, page_size: int) -> int:
        cfg = model.config
        itemsize = next(model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * page_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    def copy_on_write(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Apply the allocator's copy pairs to every layer before the step writes into the copies."""
        if src.numel():
            for k, v in zip(self.k, self.v):
                # The allocator's ids are in range by construction: no per-layer range check (a host sync on CUDA).
                kv.copy_pages(k, v, src, dst, check_pages=False)


# The last fp32 CPU call's K/V tensors, handed to the next call whose geometry fits: the pool's pages are then already
# mapped, where fresh zeros cost a page fault per 4 KiB at first touch (3000 of them, a few ms, for the tiny model's
# batch-256 call of ~50 ms). One pool is kept (the last), holding its memory between calls; only on the CPU, since on
# a GPU the trainer needs that memory between sampling calls. A running call owns its pool (taken off this list), so
# concurrent calls never share one.
_CPU_POOLS: list = []


def _take_cpu_pool(shape: tuple, layers: int, dtype: torch.dtype):
    """The kept pool if it has `layers` layers of `dtype` pages shaped like shape[1:] and at least shape[0] pages."""
    try:
        pool = _CPU_POOLS.pop()
    except IndexError:
        return None
    k0 = pool[0][0]
    if len(pool[0]) == layers and k0.dtype == dtype and k0.shape[1:] == shape[1:] and k0.shape[0] >= shape[0]:
        return pool
    return None  # does not fit: dropped, the new call allocates (and later keeps) its own


def release_cpu_pool() -> None:
    """Free the K/V memory kept for the next CPU generate call."""
    _CPU_POOLS.clear()
