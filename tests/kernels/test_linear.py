"""dash_kernels.linear: the packed AVX-512 GEMMs (csrc/linear_cpu.cpp) against fp64 references.

Tolerance: the standard forward error bound of a dot product summed in fp32, |fl(x.w) - x.w| <= gamma_K * |x|.|w|
with gamma_K = K u / (1 - K u), u = 2^-24, element by element (|x|.|w| is the product of the absolute values), plus
the final roundings of the bias add / residual add / SwiGLU product. Any fp32 summation order meets it (F.linear's
too, checked alongside); a wrong index, a missed k step or a bad tail tile breaks it by orders of magnitude.
SwiGLU adds the bound's propagation through silu(g) * u (|silu'| <= 1.1) and a few ulp for the polynomial exp.
"""

import pytest
import torch
import torch.nn.functional as F

from dash_kernels import _C
from dash_kernels.linear import (
    gate_up_silu_packed,
    gate_up_silu_ref,
    linear_packed,
    linear_ref,
    pack_gate_up,
    pack_linear,
    packed_gemm_available,
)

U = 2.0 ** -24  # fp32 unit roundoff
SILU_DERIV_MAX = 1.1  # max |d silu / dg| = 1.0998 (at g ~ 2.4)
EXP_ULPS = 4  # the polynomial exp's error (~1.5 ulp) and the silu divide / product roundings, with room

pytestmark = pytest.mark.skipif(not (_C is not None and _C.has_avx512()),
                                reason="this CPU has no AVX-512: the engine uses F.linear (tested elsewhere)")

# Odd shapes: M across the 12-row tile and 48-row task edges; K not a multiple of anything; N across the 32-column
# panel (and SwiGLU's 16-column half) edges.
SHAPES = [(1, 1, 1), (13, 31, 48), (48, 128, 32), (49, 96, 100), (257, 128, 16), (100, 384, 33)]


def dot_bound(x, w):
    """Elementwise gamma_K |x| |w|^T in fp64: [M, N]."""
    K = x.shape[1]
    gamma = K * U / (1 - K * U)
    return gamma * (x.double().abs() @ w.double().abs().T)


def check(name, ours, ref64, bound):
    err = (ours.double() - ref64).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: error exceeds the bound by {worst:.3e} (max err {err.max().item():.3e})"


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_packed_within_the_fp32_dot_bound(M, K, N, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    bound = dot_bound(x, w) + 2 * U * ref.abs()  # + the bias add's rounding
    check("linear_packed", linear_packed(x, pack_linear(w), b), ref, bound)
    check("F.linear (the bound holds for torch too)", linear_ref(x, w, b), ref, bound)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_accumulate_adds_onto_out(M, K, N):
    g = torch.Generator().manual_seed(7 + M)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    out0 = torch.randn(M, N, generator=g)
    out = out0.clone()
    assert linear_packed(x, pack_linear(w), b, out=out, accumulate=True) is out
    ref = out0.double() + x.double() @ w.double().T + b.double()
    check("accumulate", out, ref, dot_bound(x, w) + 3 * U * (ref.abs() + out0.double().abs() + b.double().abs()))
    into = torch.empty(M, N)
    assert linear_packed(x, pack_linear(w), out=into) is into
    assert torch.equal(into, linear_packed(x, pack_linear(w)))


@pytest.mark.parametrize("M,K,I", SHAPES)
def test_gate_up_silu_within_the_propagated_bound(M, K, I):
    g = torch.Generator().manual_seed(11 + M + I)
    x, wg, wu = torch.randn(M, K, generator=g), torch.randn(I, K, generator=g), torch.randn(I, K, generator=g)
    gate, up = x.double() @ wg.double().T, x.double() @ wu.double().T
    ref = F.silu(gate) * up
    bound = (SILU_DERIV_MAX * dot_bound(x, wg) * up.abs() + F.silu(gate).abs() * dot_bound(x, wu)
             + EXP_ULPS * U * ref.abs())
    check("gate_up_silu_packed", gate_up_silu_packed(x, pack_gate_up(wg, wu)), ref, bound)
    check("gate_up_silu_ref", gate_up_silu_ref(x, wg, wu), ref, bound)


def test_a_row_does_not_depend_on_its_batch_or_the_thread_count():
    """The sampler's batch invariance: the same row alone, at any place of a 257-row batch, on 1 or 2 threads."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(257, 128, generator=g), torch.randn(100, 128, generator=g)
    wg, wu = torch.randn(96, 128, generator=g), torch.randn(96, 128, generator=g)
    pw, pgu = pack_linear(w), pack_gate_up(wg, wu)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full, full_act = linear_packed(x, pw), gate_up_silu_packed(x, pgu)
        torch.set_num_threads(1)
        assert torch.equal(full, linear_packed(x, pw)) and torch.equal(full_act, gate_up_silu_packed(x, pgu))
    finally:
        torch.set_num_threads(threads)
    for r in (0, 11, 12, 47, 48, 256):
        assert torch.equal(linear_packed(x[r:r + 1], pw), full[r:r + 1])
        assert torch.equal(gate_up_silu_packed(x[r:r + 1], pgu), full_act[r:r + 1])


def test_bad_input_is_rejected_naming_the_argument():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    pw = pack_linear(w)
    with pytest.raises(ValueError, match="does not hold 5 outputs of x's K=7"):
        linear_packed(torch.randn(4, 7), pw)
    with pytest.raises(ValueError, match=r"out must be \[4, 5\]"):
        linear_packed(x, pw, out=torch.empty(4, 6))
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        linear_packed(x, pw, accumulate=True)
    with pytest.raises(ValueError, match=r"bias must be \[5\]"):
        linear_packed(x, pw, torch.randn(4))
    with pytest.raises(ValueError, match="x must be a contiguous fp32"):
        torch.ops.dash.linear_packed(x.double(), pw.data, 5)
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        pack_gate_up(w, torch.randn(6, 8))
    with pytest.raises(ValueError, match="use gate_up_silu_packed"):
        linear_packed(x, pack_gate_up(w, w))
    with pytest.raises(ValueError, match="must come from pack_gate_up"):
        gate_up_silu_packed(x, pw)
    with pytest.raises(ValueError, match="packed_gemm_available"):
        pack_linear(w.double())


def test_available_only_for_fp32_cpu_without_grad():
    w = torch.randn(4, 4)
    assert packed_gemm_available(w)
    assert not packed_gemm_available(w.double())
    assert not packed_gemm_available(w.requires_grad_())
    with torch.no_grad():
        assert packed_gemm_available(w)
