"""Rotary position embedding (HF's "rotate half" layout): `rotary_ref` out of place, `rotary_` in place on q and k.

Layers: the reference `rotary_ref` (pure torch; dash.model uses it as its `apply_rope`, so the training forward and
the sampler share one definition), the C++ kernel `torch.ops.dash.rotary_` (csrc/rotary_cpu.cpp: rewrites q and k in
place in one pass, fp32 CPU), and the public `rotary_`, which picks the kernel for contiguous fp32 CPU tensors that
need no gradient and the reference otherwise. No autograd.

Tests: `.venv/bin/python -m pytest tests/kernels/test_decode_ops.py -q`.
"""

import torch

from dash_kernels._ext import HAS_C, use_cpu_kernel

__all__ = ["rotary_", "rotary_ref"]


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, H, D] by cos / sin: [T, D], in x's dtype (HF casts the tables to the activation dtype too)."""
    cos = cos.to(x.dtype)[:, None, :]  # [T, 1, D]
    sin = sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, H, D]
    return x * cos + rotated * sin


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Applies RoPE to q: [T, Hq, D] and k: [T, Hkv, D] in place; cos, sin: [T, D] fp32 tables of their positions."""
    if use_cpu_kernel(q, k, cos, sin) and q.is_contiguous() and k.is_contiguous():
        torch.ops.dash.rotary_(q, k, cos.contiguous(), sin.contiguous())
        return
    q.copy_(rotary_ref(q, cos, sin))
    k.copy_(rotary_ref(k, cos, sin))


if HAS_C:
    @torch.library.register_fake("dash::rotary_")
    def _rotary_fake(q, k, cos, sin):
        return None
