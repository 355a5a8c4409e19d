"""RMSNorm for inference: `rms_norm(x, weight, eps)` and the residual-fused `add_rms_norm_(x, delta, weight, eps)`.

Layers: the reference `rms_norm_ref` (pure torch, the training model's own RMSNorm; HF's order, so bf16 matches HF),
the C++ kernel `torch.ops.dash.rms_norm / add_rms_norm_` (csrc/rms_norm_cpu.cpp: one pass per row, fp32 CPU), and
the public functions below, which pick the kernel for fp32 CPU tensors that need no gradient (`use_cpu_kernel`,
which also honours DASH_KERNELS_BACKEND=reference) and the reference otherwise (CUDA, 16-bit, autograd), so every
caller gets one call whatever the device. No autograd: the sampler runs under `torch.inference_mode`.

Tests: `.venv/bin/python -m pytest tests/kernels/test_decode_ops.py -q`.
"""

import torch

from dash_kernels._ext import HAS_C, use_cpu_kernel

__all__ = ["rms_norm", "add_rms_norm_", "rms_norm_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), the rms in fp32 and cast back to x's dtype before the weight (HF's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H]."""
    if use_cpu_kernel(x, weight):
        return torch.ops.dash.rms_norm(x.contiguous(), weight.contiguous(), eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The pre-norm block's residual step: x += delta IN PLACE, then returns rms_norm(x). x, delta: [..., H]."""
    if use_cpu_kernel(x, delta, weight) and x.is_contiguous():
        return torch.ops.dash.add_rms_norm_(x, delta.contiguous(), weight.contiguous(), eps)
    x.add_(delta)
    return rms_norm_ref(x, weight, eps)


if HAS_C:
    @torch.library.register_fake("dash::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("dash::add_rms_norm_")
    def _add_rms_norm_fake(x, delta, weight, eps):
        return torch.empty_like(x)
