"""Packed AVX-512 GEMMs for the sampler's fp32 CPU projections: `linear_packed(x, pack_linear(w))` = x W^T.

Why: torch's CPU wheel runs F.linear through MKL, which takes its AVX2 code on AMD CPUs; on this project's Zen 5 VM
the C++ kernel here ran the sampler's decode shapes 2.1-2.8x faster (benchmarks/linear.py,
benchmarks/results/linear.md). It needs the weight in a panel layout, so the sampler packs each layer's weights once
per `generate` call (the weights cannot change during a call; the next call packs the updated ones) and drops them
when the call ends.

Layers (no Triton kernel: on CUDA the sampler keeps cuBLAS; no autograd: inference only):
- the C++ kernels in csrc/linear_cpu.cpp, registered as the torch ops `torch.ops.dash.pack_linear`, `pack_gate_up`,
  `linear_packed` (a new output), `linear_packed_into_` (into `out`, or `out +=`) and `gate_up_silu_packed`, with the
  layouts and the micro-kernel described there; their fake kernels are registered at the end of this module;
- the public functions below, which check their arguments;
- the references `linear_ref` and `gate_up_silu_ref` (F.linear, and the training MLP's silu(gate) * up).
Every output element is one fma chain over K in a fixed order, so a row's result does not depend on the batch size,
the row's place in it or the thread count. It differs from F.linear (MKL sums in another order) by rounding only.

Tests: tests/kernels/test_linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dash_kernels._ext import _C, HAS_C, use_cpu_kernel

__all__ = ["PackedLinear", "packed_gemm_available", "pack_linear", "pack_gate_up", "linear_packed",
           "gate_up_silu_packed", "linear_ref", "gate_up_silu_ref"]


@dataclass(frozen=True, slots=True)
class PackedLinear:
    """A weight in the GEMM's panel layout.

    Attributes:
        data: [P, K, 32] fp32 panels (csrc/linear_cpu.cpp describes the layout).
        n_out: output features (N of a plain weight, I of a gate/up pair).
        gate_up: whether `data` interleaves SwiGLU's gate and up weights (`pack_gate_up`).
    """

    data: torch.Tensor
    n_out: int
    gate_up: bool = False


def packed_gemm_available(*tensors: torch.Tensor) -> bool:
    """Whether the packed GEMMs run here: _C is built, this CPU has AVX-512, and every tensor suits the fp32 CPU
    kernels (`use_cpu_kernel`: fp32, CPU, no gradient, backend not forced to the reference)."""
    return use_cpu_kernel(*tensors) and bool(_C.has_avx512())


def _check_available(op: str, *tensors: torch.Tensor) -> None:
    if not packed_gemm_available(*tensors):
        raise ValueError(f"{op}: needs fp32 CPU tensors without gradient, the built _C and an AVX-512 CPU "
                         f"(packed_gemm_available() is False here); use F.linear")


def pack_linear(w: torch.Tensor) -> PackedLinear:
    """w: [N, K] (nn.Linear's weight) -> its packed copy."""
    _check_available("pack_linear", w)
    return PackedLinear(torch.ops.dash.pack_linear(w.contiguous()), w.shape[0])


def pack_gate_up(gate: torch.Tensor, up: torch.Tensor) -> PackedLinear:
    """gate, up: [I, K] (a SwiGLU MLP's two input projections) -> one packed weight for `gate_up_silu_packed`."""
    _check_available("pack_gate_up", gate, up)
    return PackedLinear(torch.ops.dash.pack_gate_up(gate.contiguous(), up.contiguous()), gate.shape[0], gate_up=True)


def linear_packed(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """x [M, K] W^T (+ bias) -> [M, N]; into `out` if given, or `out += ...` with accumulate (the residual add).

    Args:
        x: [M, K] fp32 CPU activations.
        packed: `pack_linear(W)` of W [N, K].
        bias: [N] or None.
        out: [M, N] fp32 CPU, contiguous; required when accumulate.
    """
    if packed.gate_up:
        raise ValueError("linear_packed: packed holds a gate/up pair; use gate_up_silu_packed")
    if out is None:
        if accumulate:
            raise ValueError("linear_packed: accumulate=True needs out")
        return torch.ops.dash.linear_packed(x.contiguous(), packed.data, packed.n_out, bias)
    torch.ops.dash.linear_packed_into_(x.contiguous(), packed.data, packed.n_out, bias, out, accumulate)
    return out


def gate_up_silu_packed(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T): x [M, K] -> [M, I], on `pack_gate_up(W_gate, W_up)`."""
    if not packed.gate_up:
        raise ValueError("gate_up_silu_packed: packed must come from pack_gate_up")
    return torch.ops.dash.gate_up_silu_packed(x.contiguous(), packed.data, packed.n_out)


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
    """The reference of `linear_packed` on the unpacked weight w [N, K]."""
    y = F.linear(x, w, bias)  # [M, N]
    if out is None:
        return y
    return out.add_(y) if accumulate else out.copy_(y)


def gate_up_silu_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference of `gate_up_silu_packed`: the training MLP's silu(x W_gate^T) * (x W_up^T), [M, I]."""
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


if HAS_C:
    # Fake (meta) kernels: output shapes for torch.compile / opcheck, from the panel layout above (32 columns a panel;
    # a gate/up panel holds 16 outputs of each).
    _PANEL, _HALF = 32, 16

    @torch.library.register_fake("dash::pack_linear")
    def _pack_linear_fake(w):
        n, k = w.shape
        return w.new_empty(((n + _PANEL - 1) // _PANEL, k, _PANEL))

    @torch.library.register_fake("dash::pack_gate_up")
    def _pack_gate_up_fake(gate, up):
        i, k = gate.shape
        return gate.new_empty(((i + _HALF - 1) // _HALF, k, _PANEL))

    @torch.library.register_fake("dash::linear_packed")
    def _linear_packed_fake(x, packed, n_out, bias=None):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("dash::linear_packed_into_")
    def _linear_packed_into_fake(x, packed, n_out, bias, out, accumulate=False):
        return None

    @torch.library.register_fake("dash::gate_up_silu_packed")
    def _gate_up_silu_packed_fake(x, packed, n_out):
        return x.new_empty((x.shape[0], n_out))
