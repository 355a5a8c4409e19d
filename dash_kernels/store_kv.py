"""Store the new keys/values of T tokens in their slots of a paged KV cache: `store_kv(k, v, k_cache, v_cache, slots)`.

Cache layout, one layer: `k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim]`, contiguous; a slot is
`page * page_size + offset`, and slot -1 marks a token that is not stored (padding).

Layers (one op per file): the reference `store_kv_ref` (pure torch: boolean-mask indexing), the Triton kernel
`_store_kv_kernel` with its launcher `store_kv_fwd`, and the public `store_kv`, which picks, per cache device:
- the compiled op `torch.ops.dash.store_kv` where it has a kernel (CPU always, CUDA in a CUDA build of _C; csrc/);
- the Triton kernel on CUDA when _C has no CUDA kernel (a CUDA torch wheel installed without nvcc builds a CPU-only
  _C), or under TRITON_INTERPRET=1 when the triton backend is forced (tests). It keeps a decode step free of host
  syncs: the reference's boolean mask is a `nonzero` (one sync) per call, and its range check two more;
- the reference otherwise (no _C, or DASH_KERNELS_BACKEND=torch / reference on CUDA).
No autograd: the sampler runs under `torch.inference_mode`.

Slots outside [0, num_slots) are never written by either kernel (the Triton one masks them, the CUDA one skips them),
so an unchecked call cannot corrupt memory; `check_slots=True` additionally raises on them (one host sync off the CPU).
Tests: tests/kernels/test_kv_ops.py (CPU), tests/kernels/interp_cases.py (Triton interpreter), tests/gpu/ (CUDA),
`python -m dash_kernels.aot` (sm_80 / sm_90).
"""

import torch

from dash_kernels import backend
from dash_kernels._ext import _C, HAS_C, on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths need only torch
    triton = None

__all__ = ["native_kv_ops", "store_kv", "store_kv_fwd", "store_kv_ref", "triton_kv_ops"]

NUM_WARPS = 4  # a program moves one token's [kv_heads, head_dim] row: 128 (0.5B) to 512 (1.5B) bf16 values
NUM_STAGES = 1  # no loop to pipeline

if triton is not None:

    @triton.jit
    def _store_kv_kernel(K, V, K_cache, V_cache, Slots, num_slots, stride_kt, stride_kh, stride_vt, stride_vh,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Token t: k_cache[slot] = k[t], v_cache[slot] = v[t] with slot = Slots[t]; nothing when slot is -1 or out of
        range. Cache rows are contiguous [HEADS, HEAD_DIM]; k / v have unit stride on the head dimension."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(Slots + t).to(tl.int64)
        if (slot < 0) | (slot >= num_slots):  # -1 = padding; out of range is never written
            return
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
        dst = slot * (HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
        tl.store(K_cache + dst, k, mask=ok)
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
        tl.store(V_cache + dst, v, mask=ok)


def native_kv_ops(cache: torch.Tensor) -> bool:
    """Whether the compiled KV ops have a kernel for `cache`'s device: CPU always, CUDA only in a CUDA build of _C."""
    kind = cache.device.type
    return HAS_C and (kind == "cpu" or (kind == "cuda" and bool(_C.WITH_CUDA)))


def triton_kv_ops(cache: torch.Tensor) -> bool:
    """Whether the Triton KV kernels serve `cache`: the compiled ops have no kernel for it (CUDA with a CPU-only _C;
    tests fake that on CPU), it is a CUDA tensor or the interpreter runs, and the backend resolves to triton (not
    when DASH_KERNELS_BACKEND / the override forces torch or reference)."""
    return (not native_kv_ops(cache) and (cache.device.type == "cuda" or backend._interpreting())
            and backend.resolve(cache.device) == "triton")


def check_slot_range(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Raises ValueError if a slot is outside [-1, num_slots): free on CPU, one host sync elsewhere."""
    if slot_mapping.numel():
        lo, hi = torch.aminmax(slot_mapping)
        lo, hi = torch.stack([lo, hi]).tolist()  # one device -> host copy for both bounds
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"store_kv: slot_mapping has entries outside [-1, {num_slots}) (min {lo}, max {hi})")


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, check_slots: bool = True) -> None:
    """Reference: writes k[t], v[t] ([T, Hkv, D]) to slot slot_mapping[t] ([T] int32) of the caches, in place."""
    num_pages, page_size = k_cache.shape[:2]
    if check_slots or slot_mapping.device.type == "cpu":
        check_slot_range(slot_mapping, num_pages * page_size)
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()  # [T_kept]
    k_cache.view(num_pages * page_size, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(num_pages * page_size, *v_cache.shape[2:])[slots] = v[keep]


def check_store_kv_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The host-side checks (shapes, dtypes, devices, layout: metadata only, no sync), as the C++ op makes them."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"store_kv: k and v must be equal [T, kv_heads, head_dim], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"store_kv: caches must be equal [num_pages, page_size, {k.shape[1]}, {k.shape[2]}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int32:
        raise ValueError(f"store_kv: slot_mapping must be [T={k.shape[0]}] int32, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"store_kv: dtype mismatch: k {k.dtype}, v {v.dtype}, caches {k_cache.dtype} / "
                         f"{v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: k_cache and v_cache must be contiguous")
    if any(t.device != k_cache.device for t in (k, v, v_cache, slot_mapping)):
        raise ValueError(f"store_kv: all tensors must be on {k_cache.device}")


@on_tensor_device
def store_kv_fwd(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Triton launcher; arguments as in `store_kv` (checked by `check_store_kv_args`). No host sync."""
    T, H, D = k.shape
    if T == 0:
        return
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, num_slots, k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), HEADS=H, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H),
                           BLOCK_D=triton.next_power_of_2(D), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, check_slots: bool = True) -> None:
    """Writes the new keys/values of T tokens into the paged caches, in place.

    Args:
        k, v: [T, kv_heads, head_dim], same dtype as the caches.
        k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim], contiguous; modified in place.
        slot_mapping: [T] int32, slot of each token (page * page_size + offset), -1 to skip.
        check_slots: False skips the slot-range check off the CPU (on CUDA it costs a host sync per call); only
            for callers that guarantee every slot is in [-1, num_pages * page_size). CPU slots are always checked.
    Raises ValueError (naming the argument) on shape, dtype, device or slot-range errors.
    """
    if native_kv_ops(k_cache):
        torch.ops.dash.store_kv(k, v, k_cache, v_cache, slot_mapping, check_slots)
    elif triton_kv_ops(k_cache):
        check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
        if check_slots or slot_mapping.device.type == "cpu":
            check_slot_range(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
        store_kv_fwd(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, check_slots)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`: the K/V rows of Qwen2.5-0.5B
    (2 KV heads x 64) and 1.5B / 7B (2 / 4 KV heads x 128)."""
    specs = []
    for dt in ("bf16", "fp32"):
        sig = {"K": f"*{dt}", "V": f"*{dt}", "K_cache": f"*{dt}", "V_cache": f"*{dt}", "Slots": "*i32",
               "num_slots": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
               "HEADS": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}
        for heads, dim in ((2, 64), (2, 128), (4, 128)):
            specs.append((f"store_kv[{dt},h{heads},d{dim}]", _store_kv_kernel, sig,
                          {"HEADS": heads, "HEAD_DIM": dim, "BLOCK_H": triton.next_power_of_2(heads),
                           "BLOCK_D": triton.next_power_of_2(dim)},
                          {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs
