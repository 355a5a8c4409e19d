"""Copy whole pages of a paged KV cache, `src[i] -> dst[i]` in both caches: the copy-on-write of a forked sequence.

Cache layout as in dash_kernels/store_kv.py: `[num_pages, page_size, kv_heads, head_dim]`, contiguous.

Layers (one op per file): the reference `copy_pages_ref` (pure torch indexing), the Triton kernel `_copy_pages_kernel`
with its launcher `copy_pages_fwd`, and the public `copy_pages`, which takes the compiled op
`torch.ops.dash.copy_pages` where it has a kernel (CPU, or CUDA in a CUDA build of _C), the Triton kernel on CUDA
when _C has none (or under TRITON_INTERPRET=1 with the triton backend forced), else the reference. No autograd.

Range contract: page ids outside [0, num_pages) are never read or written by either GPU kernel (the pair is
skipped), so an unchecked call cannot touch foreign memory. `check_pages=True` (the default) raises ValueError on
them: free for CPU ids, one host sync for device ids. The sampler passes False: its pairs come from the page
allocator, in range by construction, and a sync per layer on each copy-on-write step would stall decoding.
Tests: tests/kernels/test_kv_ops.py (CPU), tests/kernels/interp_cases.py (Triton interpreter), tests/gpu/ (CUDA),
`python -m dash_kernels.aot` (sm_80 / sm_90).
"""

import torch

from dash_kernels._ext import on_tensor_device
from dash_kernels.store_kv import native_kv_ops, triton_kv_ops

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths need only torch
    triton = None

__all__ = ["copy_pages", "copy_pages_fwd", "copy_pages_ref"]

BLOCK = 2048  # elements per program: 4 KiB of a bf16 page (a 0.5B page of 256 tokens is 16 such blocks per cache)
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline

if triton is not None:

    @triton.jit
    def _copy_pages_kernel(K_cache, V_cache, Src, Dst, num_pages, page_elems, BLOCK: tl.constexpr):
        """Pair i, block j: elements [j * BLOCK, (j + 1) * BLOCK) of page Src[i] copied to page Dst[i], both caches."""
        i = tl.program_id(0)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        src = tl.load(Src + i).to(tl.int64)
        dst = tl.load(Dst + i).to(tl.int64)
        if (src < 0) | (src >= num_pages) | (dst < 0) | (dst >= num_pages):  # out of range: the pair is skipped
            return
        ok = offs < page_elems
        k = tl.load(K_cache + src * page_elems + offs, mask=ok)
        tl.store(K_cache + dst * page_elems + offs, k, mask=ok)
        v = tl.load(V_cache + src * page_elems + offs, mask=ok)
        tl.store(V_cache + dst * page_elems + offs, v, mask=ok)


def check_page_range(ids: torch.Tensor, num_pages: int, name: str) -> None:
    """Raises ValueError if an id is outside [0, num_pages): free on CPU, one host sync elsewhere."""
    if ids.numel():
        lo, hi = torch.stack(list(torch.aminmax(ids))).tolist()
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"copy_pages: {name} has page ids outside [0, {num_pages}) (min {lo}, max {hi})")


def copy_pages_ref(k_cache, v_cache, src, dst) -> None:
    """Reference: copies page src[i] to page dst[i] ([n] int32 each) in both caches, in place."""
    for ids, name in ((src, "src"), (dst, "dst")):
        check_page_range(ids, k_cache.shape[0], name)
    k_cache[dst.long()] = k_cache[src.long()]
    v_cache[dst.long()] = v_cache[src.long()]


def check_copy_pages_args(k_cache, v_cache, src, dst) -> None:
    """The host-side checks (metadata only, no sync), as the C++ op makes them."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"copy_pages: caches must be equal [num_pages, page_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("copy_pages: caches must be contiguous")
    if src.dim() != 1 or dst.shape != src.shape or src.dtype != torch.int32 or dst.dtype != torch.int32:
        raise ValueError(f"copy_pages: src and dst must be equal 1-D int32, got {tuple(src.shape)} {src.dtype} and "
                         f"{tuple(dst.shape)} {dst.dtype}")
    if any(t.device != k_cache.device for t in (v_cache, src, dst)):
        raise ValueError(f"copy_pages: all tensors must be on {k_cache.device}")


@on_tensor_device
def copy_pages_fwd(k_cache, v_cache, src, dst) -> None:
    """Triton launcher; arguments as in `copy_pages` (checked by `check_copy_pages_args`). No host sync."""
    n = src.numel()
    page_elems = k_cache[0].numel()
    if n == 0 or page_elems == 0:
        return
    _copy_pages_kernel[(n, triton.cdiv(page_elems, BLOCK))](
        k_cache, v_cache, src.contiguous(), dst.contiguous(), k_cache.shape[0], page_elems, BLOCK=BLOCK,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def copy_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
               check_pages: bool = True) -> None:
    """Copies whole pages `src[i] -> dst[i]` in both caches, in place.

    Args:
        k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim], contiguous; modified in place.
        src, dst: [n] int32 page ids; a page may be a source several times, a destination once.
        check_pages: False skips the id range check off the CPU (one host sync per call); out-of-range pairs are
            then skipped by the GPU kernels, never raised. CPU ids are always checked.
    Raises ValueError (naming the argument) on shape, dtype, device or id-range errors.
    """
    num_pages = k_cache.shape[0] if k_cache.dim() else 0
    if native_kv_ops(k_cache):
        if check_pages and src.device.type != "cpu":  # the CUDA op checks no range: it would sync per call
            for ids, name in ((src, "src"), (dst, "dst")):
                check_page_range(ids, num_pages, name)
        torch.ops.dash.copy_pages(k_cache, v_cache, src, dst)
    elif triton_kv_ops(k_cache):
        check_copy_pages_args(k_cache, v_cache, src, dst)
        if check_pages or src.device.type == "cpu":
            for ids, name in ((src, "src"), (dst, "dst")):
                check_page_range(ids, num_pages, name)
        copy_pages_fwd(k_cache, v_cache, src, dst)
    else:
        copy_pages_ref(k_cache, v_cache, src, dst)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`."""
    sig = {"K_cache": "*{dt}", "V_cache": "*{dt}", "Src": "*i32", "Dst": "*i32", "num_pages": "i32",
           "page_elems": "i32", "BLOCK": "constexpr"}
    return [(f"copy_pages[{dt}]", _copy_pages_kernel, {k: s.format(dt=dt) for k, s in sig.items()}, {"BLOCK": BLOCK},
             {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}) for dt in ("bf16", "fp32")]
