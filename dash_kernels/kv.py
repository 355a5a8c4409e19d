"""Paged KV-cache ops used by the sampler, in one namespace: store new K/V into their slots, copy whole pages.

Cache layout, one layer: `k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim]`; a slot is
`page * page_size + offset`, and slot -1 marks a token that is not stored (padding).

Each op lives in its own module with its layers (reference, Triton kernel and launcher, public function):
dash_kernels/store_kv.py and dash_kernels/copy_pages.py. Backends, chosen per cache device: the compiled torch ops
`torch.ops.dash.store_kv / copy_pages` where they have a kernel (C++ on CPU, CUDA kernels in a CUDA build, see
csrc/), the Triton kernels on CUDA when _C has no CUDA kernel (a CUDA torch wheel installed without nvcc builds a
CPU-only _C), and the pure-torch references elsewhere. This module also registers the ops' fake (meta) kernels.
"""

import torch

from dash_kernels._ext import _C, HAS_C  # noqa: F401 (tests patch _C.WITH_CUDA through this module)
from dash_kernels.copy_pages import copy_pages, copy_pages_ref
from dash_kernels.store_kv import native_kv_ops, store_kv, store_kv_ref, triton_kv_ops

__all__ = ["copy_pages", "copy_pages_ref", "native_kv_ops", "store_kv", "store_kv_ref", "triton_kv_ops"]

if HAS_C:
    # Fake (meta) kernels so torch.compile / opcheck can trace the in-place ops: they return nothing.
    @torch.library.register_fake("dash::store_kv")
    def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping, check_slots=True):
        return None

    @torch.library.register_fake("dash::copy_pages")
    def _copy_pages_fake(k_cache, v_cache, src, dst):
        return None
