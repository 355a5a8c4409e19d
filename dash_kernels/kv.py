"""Paged KV-cache ops used by the sampler: store new K/V into their slots, copy whole pages (copy-on-write).

Cache layout, one layer: `k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim]`; a slot is
`page * page_size + offset`, and slot -1 marks a token that is not stored (padding).

Backends: the compiled torch ops `torch.ops.dash.store_kv / copy_pages` (C++ on CPU, CUDA kernels in a CUDA build,
see csrc/), and the pure-torch references below, which tests compare against and which run where the ops have no
kernel: _C missing, or CUDA tensors with a CPU-only _C (a CUDA torch wheel installed without nvcc builds one).
"""

import torch

from dash_kernels._ext import _C, HAS_C


def native_kv_ops(cache: torch.Tensor) -> bool:
    """Whether the compiled ops have a kernel for `cache`'s device: CPU always, CUDA only in a CUDA build of _C."""
    kind = cache.device.type
    return HAS_C and (kind == "cpu" or (kind == "cuda" and bool(_C.WITH_CUDA)))


def _check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel() and (int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= num_slots):
        raise ValueError(f"store_kv: slot_mapping has entries outside [-1, {num_slots})")


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, check_slots: bool = True) -> None:
    """Reference: writes k[t], v[t] ([T, Hkv, D]) to slot slot_mapping[t] ([T] int32) of the caches, in place."""
    num_pages, page_size = k_cache.shape[:2]
    if check_slots or slot_mapping.device.type == "cpu":
        _check_slots(slot_mapping, num_pages * page_size)
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()  # [T_kept]
    k_cache.view(num_pages * page_size, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(num_pages * page_size, *v_cache.shape[2:])[slots] = v[keep]


def copy_pages_ref(k_cache, v_cache, src, dst) -> None:
    """Reference: copies page src[i] to page dst[i] ([n] int32 each) in both caches, in place."""
    num_pages = k_cache.shape[0]
    for ids, name in ((src, "src"), (dst, "dst")):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise ValueError(f"copy_pages: {name} has page ids outside [0, {num_pages})")
    k_cache[dst.long()] = k_cache[src.long()]
    v_cache[dst.long()] = v_cache[src.long()]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, check_slots: bool = True) -> None:
    """Writes the new keys/values of T tokens into the paged caches, in place.

    Args:
        k, v: [T, kv_heads, head_dim], same dtype as the caches.
        k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim], contiguous; modified in place.
        slot_mapping: [T] int32, slot of each token (page * page_size + offset), -1 to skip.
        check_slots: False skips the slot-range check off the CPU (on CUDA it costs two host syncs per call); only
            for callers that guarantee every slot is in [-1, num_pages * page_size). CPU slots are always checked.
    Raises ValueError (naming the argument) on shape, dtype, device or slot-range errors.
    """
    if native_kv_ops(k_cache):
        torch.ops.dash.store_kv(k, v, k_cache, v_cache, slot_mapping, check_slots)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, check_slots)


def copy_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copies whole pages `src[i] -> dst[i]` ([n] int32) in both caches, in place (copy-on-write of a fork)."""
    if native_kv_ops(k_cache):
        torch.ops.dash.copy_pages(k_cache, v_cache, src, dst)
    else:
        copy_pages_ref(k_cache, v_cache, src, dst)


if HAS_C:
    # Fake (meta) kernels so torch.compile / opcheck can trace the in-place ops: they return nothing.
    @torch.library.register_fake("dash::store_kv")
    def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping, check_slots=True):
        return None

    @torch.library.register_fake("dash::copy_pages")
    def _copy_pages_fake(k_cache, v_cache, src, dst):
        return None
