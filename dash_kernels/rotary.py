"""Rotary position embedding (HF's "rotate half" layout): `rotary_ref` out of place, `rotary_` in place on q and k.

Layers: the reference `rotary_ref` (pure torch; dash.model uses it as its `apply_rope`, so the training forward and
the sampler share one definition), two kernels, the C++ `torch.ops.dash.rotary_` (csrc/rotary_cpu.cpp: rewrites q and
k in place in one pass, fp32 CPU) and the Triton `_rotary_kernel` with its launcher `rotary_fwd` (one program per
token and tensor, any float dtype; CUDA, where the reference is ~7 launches per tensor), and the public `rotary_`,
which takes Triton for CUDA tensors (or under TRITON_INTERPRET=1 when the triton backend is forced), C++ for
contiguous fp32 CPU tensors, and the reference otherwise or whenever a gradient is needed. No autograd.

Tests: `.venv/bin/python -m pytest tests/kernels/test_decode_ops.py -q`; the Triton kernel in
tests/kernels/interp_cases.py (interpreter) and `python -m dash_kernels.aot` (sm_80 / sm_90).
"""

import torch

from dash_kernels._ext import HAS_C, on_tensor_device, use_cpu_kernel, use_triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths need only torch
    triton = None

__all__ = ["rotary_", "rotary_ref", "rotary_fwd"]

NUM_STAGES = 1  # no loop to pipeline; launcher and `python -m dash_kernels.aot` both read it
NUM_WARPS = 4  # a program rotates one token's heads, [H, D / 2] pairs: 28 x 64 at 7B would spill with fewer

if triton is not None:

    @triton.jit
    def _rotary_kernel(X, Cos, Sin, stride_xt, stride_xh, stride_c, H, HALF, BLOCK_H: tl.constexpr,
                       BLOCK_HALF: tl.constexpr):
        """Token t of x [T, H, D], in place: x1 <- x1 c1 - x2 s1, x2 <- x2 c2 + x1 s2 (x1, x2 the two halves of D),
        computed in fp32 from the tables rounded to x's dtype (the reference casts them first)."""
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        ok = (offs_h[:, None] < H) & (offs_d[None, :] < HALF)
        d_ok = offs_d < HALF
        dt = X.dtype.element_ty
        c1 = tl.load(Cos + t * stride_c + offs_d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        c2 = tl.load(Cos + t * stride_c + HALF + offs_d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        s1 = tl.load(Sin + t * stride_c + offs_d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        s2 = tl.load(Sin + t * stride_c + HALF + offs_d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        p1 = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_HALF]
        x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=ok, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c1[None, :] - x2 * s1[None, :]).to(dt), mask=ok)
        tl.store(p1 + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(dt), mask=ok)


@on_tensor_device
def rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Triton launcher: rotates x [T, H, D] (unit stride on D) in place; cos, sin: [T, D]."""
    T, H, D = x.shape
    if T == 0 or H == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotary_kernel[(T,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H, D // 2,
                         BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(D // 2),
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`: Qwen2.5-0.5B's q (14 heads)
    and k (2 heads) at head_dim 64, 1.5B's q (12 heads) and k (2) at head_dim 128, 7B's q (28 heads) at 128."""
    specs = []
    for dt in ("fp32", "bf16"):
        sig = {"X": f"*{dt}", "Cos": "*fp32", "Sin": "*fp32", "stride_xt": "i32", "stride_xh": "i32",
               "stride_c": "i32", "H": "i32", "HALF": "i32", "BLOCK_H": "constexpr", "BLOCK_HALF": "constexpr"}
        for H, D in ((14, 64), (2, 64), (12, 128), (2, 128), (28, 128)):
            specs.append((f"rotary[{dt},h{H},d{D}]", _rotary_kernel, sig,
                          {"BLOCK_H": triton.next_power_of_2(H), "BLOCK_HALF": D // 2},
                          {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, H, D] by cos / sin: [T, D], in x's dtype (HF casts the tables to the activation dtype too)."""
    cos = cos.to(x.dtype)[:, None, :]  # [T, 1, D]
    sin = sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, H, D]
    return x * cos + rotated * sin


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Applies RoPE to q: [T, Hq, D] and k: [T, Hkv, D] in place; cos, sin: [T, D] fp32 tables of their positions."""
    if use_triton_kernel(q, k) and q.stride(-1) == 1 and k.stride(-1) == 1:
        rotary_fwd(q, cos, sin)
        rotary_fwd(k, cos, sin)
        return
    if use_cpu_kernel(q, k, cos, sin) and q.is_contiguous() and k.is_contiguous():
        torch.ops.dash.rotary_(q, k, cos.contiguous(), sin.contiguous())
        return
    q.copy_(rotary_ref(q, cos, sin))
    k.copy_(rotary_ref(k, cos, sin))


if HAS_C:
    @torch.library.register_fake("dash::rotary_")
    def _rotary_fake(q, k, cos, sin):
        return None
