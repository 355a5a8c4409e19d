"""RMSNorm for inference: `rms_norm(x, weight, eps)` and the residual-fused `add_rms_norm_(x, delta, weight, eps)`.

Layers: the reference `rms_norm_ref` (pure torch, the training model's own RMSNorm; HF's order, so bf16 matches HF),
two kernels, the C++ `torch.ops.dash.rms_norm / add_rms_norm_` (csrc/rms_norm_cpu.cpp: one pass per row, fp32 CPU)
and the Triton `_rms_norm_kernel` with its launcher `rms_norm_fwd` (one program per row, any float dtype, the
residual add optional; CUDA), and the public functions below. They take Triton for CUDA tensors (or under
TRITON_INTERPRET=1 when the triton backend is forced), C++ for fp32 CPU tensors (`use_cpu_kernel`), and the reference
otherwise or whenever a gradient is needed (DASH_KERNELS_BACKEND=reference forces it), so every caller gets one call
whatever the device. The reference on CUDA is 6-7 kernel launches per call where the kernel is one: a decode step
launches two per layer. No autograd: the sampler runs under `torch.inference_mode`.

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

__all__ = ["rms_norm", "add_rms_norm_", "rms_norm_ref", "rms_norm_fwd"]

NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline; launcher and `python -m dash_kernels.aot` both read it

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, Delta, W, Out, stride_x, stride_d, stride_o, H, eps,
                         ADD: tl.constexpr, BLOCK_H: tl.constexpr):
        """Row r: with ADD, x += delta (rounded to x's dtype, stored back); out = w * (x * rsqrt(mean(x^2) + eps)), the
        normalised x rounded to x's dtype before the weight multiplies it (HF's order, as the reference)."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_H)
        ok = offs < H
        x = tl.load(X + r * stride_x + offs, mask=ok, other=0.0)
        if ADD:
            x = (x.to(tl.float32) + tl.load(Delta + r * stride_d + offs, mask=ok, other=0.0).to(tl.float32))
            x = x.to(X.dtype.element_ty)
            tl.store(X + r * stride_x + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        normed = (xf * inv).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + r * stride_o + offs, (w * normed).to(Out.dtype.element_ty), mask=ok)


@on_tensor_device
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher. x, delta: [..., H] with unit stride on H; with delta, x += delta IN PLACE first."""
    H = x.shape[-1]
    x2 = x.view(-1, H)  # a view: the residual update must land in x
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    d2 = x2 if delta is None else delta.reshape(-1, H).contiguous()
    _rms_norm_kernel[(x2.shape[0],)](x2, d2, weight.contiguous(), out, x2.stride(0), d2.stride(0), out.stride(0), H,
                                     eps, ADD=delta is not None, BLOCK_H=triton.next_power_of_2(H),
                                     num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.view(x.shape)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`: the decode widths of
    Qwen2.5-0.5B (896), 1.5B (1536) and 7B (3584), with and without the residual add."""
    specs = []
    for dt in ("fp32", "bf16"):
        sig = {"X": f"*{dt}", "Delta": f"*{dt}", "W": f"*{dt}", "Out": f"*{dt}", "stride_x": "i32", "stride_d": "i32",
               "stride_o": "i32", "H": "i32", "eps": "fp32", "ADD": "constexpr", "BLOCK_H": "constexpr"}
        for H in (896, 1536, 3584):
            for add in (False, True):
                specs.append((f"rms_norm[{dt},h{H},{'add' if add else 'plain'}]", _rms_norm_kernel, sig,
                              {"ADD": add, "BLOCK_H": triton.next_power_of_2(H)},
                              {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), the rms in fp32 and cast back to x's dtype before the weight (HF's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H]."""
    if use_triton_kernel(x, weight):
        return rms_norm_fwd(x.contiguous(), weight, eps)
    if use_cpu_kernel(x, weight):
        return torch.ops.dash.rms_norm(x.contiguous(), weight.contiguous(), eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The pre-norm block's residual step: x += delta IN PLACE, then returns rms_norm(x). x, delta: [..., H]."""
    if use_triton_kernel(x, delta, weight) and x.is_contiguous():
        return rms_norm_fwd(x, weight, eps, delta)
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
