"""The SwiGLU gate for inference: `silu_mul_(gate, up)` sets gate <- silu(gate) * up in place and returns it.

Layers: the reference `silu_mul_ref` (pure torch, the training MLP's `F.silu(gate) * up`), the Triton kernel
`_silu_mul_kernel` with its launcher `silu_mul_fwd` (one pass, any float dtype, computed in fp32; CUDA, where the
in-place torch version is two launches), and the public `silu_mul_`. On CPU the public function runs torch's in-place
`silu_` + `mul_`: a fused C++ loop with a polynomial exp was measured slower than those two vectorised ops (1.5 vs
0.65 ns an element on this project's CPU), so there is no C++ kernel. No autograd (inference only).

Tests: tests/kernels/test_decode_ops.py (CPU path); the Triton kernel in tests/kernels/interp_cases.py (interpreter)
and `python -m dash_kernels.aot` (sm_80 / sm_90).
"""

import torch
import torch.nn.functional as F

from dash_kernels._ext import on_tensor_device, use_triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs only torch
    triton = None

__all__ = ["silu_mul_", "silu_mul_ref", "silu_mul_fwd"]

BLOCK = 1024  # elements per program
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline; launcher and `python -m dash_kernels.aot` both read it

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(Gate, Up, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(Gate + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(Up + offs, mask=ok, other=0.0).to(tl.float32)
        # silu(g) rounded to the activation dtype before the product, as the reference's two torch ops round it.
        silu = (g / (1.0 + tl.exp(-g))).to(Gate.dtype.element_ty).to(tl.float32)
        tl.store(Gate + offs, (silu * u).to(Gate.dtype.element_ty), mask=ok)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, out of place. gate, up: [..., I]."""
    return F.silu(gate) * up


@on_tensor_device
def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton launcher: gate (contiguous) <- silu(gate) * up in place; returns gate."""
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up.contiguous(), n, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                                    num_stages=NUM_STAGES)
    return gate


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate <- silu(gate) * up IN PLACE; returns gate. gate, up: [..., I], same shape."""
    if use_triton_kernel(gate, up) and gate.is_contiguous() and up.shape == gate.shape:
        return silu_mul_fwd(gate, up)
    return F.silu(gate, inplace=True).mul_(up)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`."""
    return [(f"silu_mul[{dt}]", _silu_mul_kernel, {"Gate": f"*{dt}", "Up": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
             {"BLOCK": BLOCK}, {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}) for dt in ("fp32", "bf16")]
