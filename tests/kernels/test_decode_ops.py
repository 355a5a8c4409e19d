"""The sampler's fused inference ops (dash_kernels.rms_norm, dash_kernels.rotary) against their references.

Criterion (kernel_testing.assert_close_to_ref): max |ours - fp64 ref| <= 2 * max |fp32 torch ref - fp64 ref| + atol,
NaN / inf in the same places. The C++ kernels sum x^2 in a different order than torch's mean, so they are not
bitwise equal to the fp32 reference; the in-place residual add and the fallback paths are checked bitwise.
"""

import pytest
import torch

import dash_kernels
from dash_kernels.rms_norm import add_rms_norm_, rms_norm, rms_norm_ref
from dash_kernels.rotary import rotary_, rotary_ref
from tests.kernels.kernel_testing import assert_close_to_ref

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

EPS = 1e-6
# Odd widths (not multiples of the 8 SIMD lanes), a single row, a 3-d input, and the tiny / Qwen2.5-0.5B widths.
NORM_SHAPES = [(1, 1), (9, 41), (257, 131), (3, 5, 128), (64, 896)]


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_matches_reference(shape):
    x, w = _randn(*shape, scale=3.0), _randn(shape[-1], seed=1)
    ref64 = rms_norm_ref(x.double(), w.double(), EPS)
    assert_close_to_ref("rms_norm", rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), ref64,
                        atol=2e-6 * ref64.abs().max().item())


@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm_updates_residual_and_normalises(shape):
    x, delta, w = _randn(*shape), _randn(*shape, seed=2), _randn(shape[-1], seed=1)
    expected_x = x + delta  # one fp32 add per element: the in-place update must be bitwise the same
    out = add_rms_norm_(x, delta, w, EPS)
    assert torch.equal(x, expected_x)
    ref64 = rms_norm_ref(expected_x.double(), w.double(), EPS)
    assert_close_to_ref("add_rms_norm_", out, rms_norm_ref(expected_x, w, EPS), ref64,
                        atol=2e-6 * ref64.abs().max().item())


def test_rms_norm_nan_and_inf_rows_match_reference():
    x, w = _randn(4, 16), _randn(16, seed=1)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    ours, ref = rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.allclose(ours[[0, 3]], ref[[0, 3]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 1, 1, 2), (7, 4, 2, 32), (33, 6, 3, 10), (5, 14, 2, 64)])
def test_rotary_in_place_matches_reference(T, Hq, Hkv, D):
    q, k = _randn(T, Hq, D), _randn(T, Hkv, D, seed=1)
    angles = _randn(T, D // 2, seed=2, scale=10.0)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, D]: rotate-half tables
    cos64, sin64 = cos.double(), sin.double()
    q_ref64, k_ref64 = rotary_ref(q.double(), cos64, sin64), rotary_ref(k.double(), cos64, sin64)
    q_ref32, k_ref32 = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    rotary_(q, k, cos, sin)
    for name, ours, naive, ref in (("q", q, q_ref32, q_ref64), ("k", k, k_ref32, k_ref64)):
        assert_close_to_ref(f"rotary_ {name}", ours, naive, ref, atol=2e-6 * ref.abs().max().item())


def test_fallbacks_use_the_reference_exactly():
    """16-bit inputs, inputs that need a gradient and non-contiguous in-place targets take the torch reference."""
    x, w = _randn(6, 40).bfloat16(), _randn(40, seed=1).bfloat16()
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
    xg = _randn(6, 40).requires_grad_()
    out = rms_norm(xg, _randn(40, seed=1), EPS)
    out.sum().backward()  # the reference path keeps autograd working
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    base, delta, w32 = _randn(40, 6).t(), _randn(6, 40, seed=3), _randn(40, seed=1)  # base: non-contiguous [6, 40]
    expected = base + delta
    out = add_rms_norm_(base, delta, w32, EPS)
    assert torch.equal(base, expected) and torch.equal(out, rms_norm_ref(expected, w32, EPS))
    q, k, cos, sin = _randn(3, 2, 8).bfloat16(), _randn(3, 1, 8).bfloat16(), _randn(3, 8), _randn(3, 8, seed=4)
    q_ref, k_ref = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    rotary_(q, k, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_reference_backend_forces_the_torch_references():
    """DASH_KERNELS_BACKEND=reference (here: the test override) routes fp32 CPU inputs to the references, bitwise."""
    from dash_kernels.backend import use_backend

    x, d, w = _randn(9, 41, scale=3.0), _randn(9, 41, seed=2), _randn(41, seed=1)
    q, k, cos, sin = _randn(7, 4, 32), _randn(7, 2, 32, seed=1), _randn(7, 32, seed=2), _randn(7, 32, seed=3)
    q_ref, k_ref = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    with use_backend("reference"):
        assert torch.equal(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
        xr = x.clone()
        assert torch.equal(add_rms_norm_(xr, d, w, EPS), rms_norm_ref(x + d, w, EPS))
        rotary_(q, k, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.dash.rms_norm(_randn(4, 8), _randn(7), EPS)
    with pytest.raises(ValueError, match="delta must be"):
        torch.ops.dash.add_rms_norm_(_randn(4, 8), _randn(4, 9), _randn(8), EPS)
    with pytest.raises(ValueError, match="cos and sin"):
        torch.ops.dash.rotary_(_randn(4, 2, 8), _randn(4, 1, 8), _randn(4, 6), _randn(4, 6))
    with pytest.raises(ValueError, match="even head_dim"):
        torch.ops.dash.rotary_(_randn(4, 2, 7), _randn(4, 1, 7), _randn(4, 7), _randn(4, 7))


def test_opcheck_schema_and_fake_kernels():
    x, d, w = _randn(5, 24), _randn(5, 24, seed=1), _randn(24, seed=2)
    torch.library.opcheck(torch.ops.dash.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.dash.add_rms_norm_.default, (x.clone(), d, w, EPS))
    q, k, cos, sin = _randn(5, 4, 8), _randn(5, 2, 8, seed=1), _randn(5, 8, seed=2), _randn(5, 8, seed=3)
    torch.library.opcheck(torch.ops.dash.rotary_.default, (q, k, cos, sin))


def test_silu_mul_cpu_path_is_the_reference_in_place():
    """On CPU silu_mul_ runs torch's own silu_ + mul_ (no C++ kernel): bitwise the reference, written into gate."""
    from dash_kernels.silu_mul import silu_mul_, silu_mul_ref

    gate, up = _randn(9, 41, scale=4.0), _randn(9, 41, seed=5)
    expected = silu_mul_ref(gate, up)
    out = silu_mul_(gate, up)
    assert out is gate and torch.equal(gate, expected)
