"""Triton kernels on CPU under the Triton interpreter, against the fp64 reference.

Not collected by a plain `pytest` run (the name does not start with test_): test_triton_interpreter.py runs this file
in a subprocess with TRITON_INTERPRET=1 and DASH_KERNELS_BACKEND=triton, because the interpreter must be switched on
before triton is first imported and must not leak into the rest of the suite. Shapes are small and odd (N=37, H=31,
V=123 / 1000): the interpreter executes every program in numpy.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

import triton
import triton.language as tl
from kernel_testing import (
    assert_close_to_ref,
    check_loss_against_ref,
    linear_inputs,
    logprob_runner,
    loss_inputs,
    naive_alt_logprobs,
    run_with_grads,
)

from dash_kernels import backend, fused_policy_loss, token_logprobs, token_logprobs_from_logits
from dash_kernels.ops import logprobs_from_logits
from dash_kernels.ops import token_logprobs as tlp_module
from dash_kernels.ops import token_logprobs_bwd as tlp_bwd_module
from dash_kernels.ops._triton_utils import offsets_2d
from dash_kernels.reference import token_logprobs_from_logits_ref, token_logprobs_ref


@pytest.fixture(autouse=True)
def triton_backend():
    with backend.use_backend("triton"):
        yield


@pytest.fixture(autouse=True)
def no_torch_fallback(monkeypatch):
    """Every op must reach a Triton kernel: the chunked torch sweep is made to fail loudly."""
    from dash_kernels.ops import _chunked

    def boom(*a, **k):
        raise AssertionError("torch backend used under the triton backend")

    monkeypatch.setattr(_chunked, "sweep", boom)


def _spy(monkeypatch, module, name, calls):
    """Replace module.name (a Triton kernel) by a wrapper that records each launch."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            calls.append(name)
            return kernel[grid]

    monkeypatch.setattr(module, name, Spy())


@pytest.mark.parametrize("N,H,V", [(37, 31, 123), (37, 31, 1000), (150, 20, 300)])
@pytest.mark.parametrize("temperature,bias,entropy", [(1.0, False, False), (0.7, True, True)])
def test_token_logprobs_kernels(N, H, V, temperature, bias, entropy):
    hidden, weight, targets, b = linear_inputs(N, H, V, seed=V, bias=bias, ignore_frac=0.2)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)]
    run = logprob_runner(hidden, weight, targets, b, temperature, entropy, upstream)

    ours, g_ours = run(token_logprobs)
    naive, g_naive = run(token_logprobs_ref, torch.float32)
    naive2, g_naive2 = run(naive_alt_logprobs, torch.float32)
    ref, g_ref = run(token_logprobs_ref, torch.float64)
    for name, a, n, n2, r in zip(("logp", "entropy"), ours, naive, naive2, ref):
        assert_close_to_ref(name, a, [n, n2], r)
    for name, a, n, n2, r in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_naive, g_naive2, g_ref):
        if r is not None:
            assert_close_to_ref(name, a, [n, n2], r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_kernels(dtype):
    g = torch.Generator().manual_seed(3)
    N, V = 37, 1000
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    upstream = [torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)]

    def run(fn, **kw):
        return run_with_grads(lambda z: fn(z, targets, 0.8, True, **kw), [logits], upstream)

    ours, g_ours = run(token_logprobs_from_logits)
    naive, g_naive = run(token_logprobs_from_logits_ref, dtype=torch.float32)
    ref, g_ref = run(token_logprobs_from_logits_ref, dtype=torch.float64)
    for name, a, n, r in zip(("logp", "entropy"), ours, naive, ref):
        assert_close_to_ref(name, a, n, r)
    assert g_ours[0].dtype == dtype
    if dtype == torch.float32:
        assert_close_to_ref("d_logits", g_ours[0], g_naive[0], g_ref[0])
    else:
        # The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even): allow one bf16 ulp.
        err = (g_ours[0].double() - g_ref[0]).abs()
        assert (err <= 2.0**-7 * g_ref[0].abs() + 1e-6).all(), err.max()


@pytest.mark.parametrize("kw", [{"loss_type": "dapo"},
                                {"loss_type": "grpo", "beta": 0.04, "adv_threshold": 0.1, "temperature": 0.7},
                                {"loss_type": "bnpo", "beta": 0.1, "entropy_coef": 0.01, "eps_high": 0.28},
                                {"loss_type": "dr_grpo", "delta": 1.5, "normalizer": 40.0, "beta": 0.1,
                                     "kl_bias_correction": True}],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("V,bias", [(123, False), (1000, True)])
def test_fused_loss_kernels(kw, V, bias):
    inp = loss_inputs(3, 13, 31, V, seed=V, bias=bias, per_token_adv=bias)
    check_loss_against_ref(fused_policy_loss, inp, **kw)


def test_fused_loss_edge_cases():
    inp = loss_inputs(3, 5, 16, 40, seed=6)
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    loss, metrics = fused_policy_loss(h, w, inp["targets"], torch.tensor([0.01, -0.02, 0.0]), inp["mask"],
                                      inp["old_logp"], inp["ref_logp"], beta=0.1, adv_threshold=0.1)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    single = loss_inputs(5, 1, 16, 77, seed=8, mask_frac=0.0)
    check_loss_against_ref(fused_policy_loss, single, loss_type="grpo", beta=0.05)
    empty, _ = fused_policy_loss(torch.randn(0, 3, 8, requires_grad=True), torch.randn(20, 8),
                                 torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), torch.ones(0, 3))
    assert empty.item() == 0.0


def test_kernels_really_ran(monkeypatch):
    """The Triton launchers are what ran above (not a silent fallback)."""
    calls = []
    for mod, name in ((tlp_module, "_token_logprobs_fwd_kernel"), (tlp_bwd_module, "_token_logprobs_bwd_kernel"),
                      (logprobs_from_logits, "_logprobs_from_logits_fwd_kernel")):
        _spy(monkeypatch, mod, name, calls)
    hidden, weight, targets, _ = linear_inputs(8, 16, 40)
    h = hidden.requires_grad_()
    token_logprobs(h, weight, targets).sum().backward()
    token_logprobs_from_logits(torch.randn(4, 40), targets[:4])
    assert calls == ["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_logprobs_from_logits_fwd_kernel"]


@triton.jit
def _offsets_probe_kernel(out_ptr, row, row_stride, col, BLOCK: tl.constexpr):
    rows = row + tl.arange(0, BLOCK)
    cols = col + tl.arange(0, BLOCK)
    offs = offsets_2d(rows, row_stride, cols, 1)  # [BLOCK, BLOCK] int64
    idx = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + idx, offs)


def test_int64_offsets():
    """Row 20000 of a V = 151936 row-major matrix sits past 2**31: the shared offset helper must not wrap."""
    row, stride, col, block = 20000, 151936, 151000, 16
    out = torch.empty(block * block, dtype=torch.int64)
    _offsets_probe_kernel[(1,)](out, row, stride, col, BLOCK=block)
    expected = [(row + i) * stride + col + j for i in range(block) for j in range(block)]
    assert expected[0] > 2**31
    assert out.tolist() == expected


@pytest.mark.parametrize("V", [1, 7, 300, 2500])  # 2500: three blocks of the kernel's BLOCK_V = 1024
def test_sample_rows_kernel(V, monkeypatch):
    """The sampler's Triton sampling kernel against the reference (sample_testing's criterion)."""
    from sample_testing import check_against_reference

    from dash_kernels import sample_rows as sample

    calls = []
    _spy(monkeypatch, sample, "_sample_rows_kernel", calls)
    check_against_reference(V, B=33)
    assert calls, "the Triton kernel did not run"


def test_sample_rows_kernel_edges():
    """First argmax on ties, masked stop tokens holding all the mass, and inverse-CDF frequencies on a u grid."""
    from dash_kernels.sample_rows import sample_rows

    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [9.0, 2.0, 3.0, 3.0]])
    tokens, _ = sample_rows(logits, torch.zeros(2), torch.full((2,), 0.5, dtype=torch.float64),
                            torch.tensor([[-1], [0]]), torch.tensor([False, True]))
    assert tokens.tolist() == [1, 2]
    V, N = 2100, 64
    masked = torch.full((N, V), -20.0)
    masked[:, 1500:] = 30.0  # all the mass, on stop tokens past the first two blocks
    stop = torch.arange(1500, V).expand(N, -1).contiguous()
    tokens, _ = sample_rows(masked, torch.ones(N), torch.linspace(1e-9, 1 - 1e-12, N, dtype=torch.float64), stop,
                            torch.ones(N, dtype=torch.bool))
    assert (tokens < 1500).all()
    N, V = 2000, 5
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    tokens, _ = sample_rows(logits.expand(N, V).contiguous(), torch.full((N,), 0.7), u)
    counts = torch.bincount(tokens, minlength=V).double()
    assert (counts - N * (logits[0].double() / 0.7).softmax(0)).abs().max() <= 1.0 + 1e-6


BF16_TRUNCATION_ULPS = 2  # roundings to bf16 on a kernel's path from fp32: the normalised x and the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (9, 41), (3, 5, 64)])  # one value, an odd width, a 3-d input
def test_decode_norm_and_rope_kernels(dtype, shape, monkeypatch):
    """The sampler's RMSNorm (plain and residual-fused), RoPE and SiLU * up Triton kernels against fp64, bf16 too."""
    from dash_kernels import rms_norm as rms_module
    from dash_kernels import rotary as rotary_module
    from dash_kernels import silu_mul as silu_module
    from dash_kernels.rms_norm import add_rms_norm_, rms_norm, rms_norm_ref
    from dash_kernels.rotary import rotary_, rotary_ref
    from dash_kernels.silu_mul import silu_mul_, silu_mul_ref

    calls = []
    _spy(monkeypatch, rms_module, "_rms_norm_kernel", calls)
    _spy(monkeypatch, rotary_module, "_rotary_kernel", calls)
    _spy(monkeypatch, silu_module, "_silu_mul_kernel", calls)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    delta = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    eps = 1e-6
    ref64 = rms_norm_ref(x.double(), w.double(), eps)
    # The interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so in bf16 each of the kernel's
    # roundings may cost a whole ulp (2^-7 of the value) where the torch path costs half: two of them are allowed.
    trunc = BF16_TRUNCATION_ULPS * 2.0**-7 if dtype == torch.bfloat16 else 0.0
    atol = (2e-6 + trunc) * ref64.abs().max().item()
    assert_close_to_ref("rms_norm", rms_norm(x, w, eps), rms_norm_ref(x, w, eps), ref64, atol=atol)
    summed = x + delta  # the residual update rounds to x's dtype, as the reference's in-place add
    xr = x.clone()
    out = add_rms_norm_(xr, delta, w, eps)
    if dtype == torch.float32:
        assert torch.equal(xr, summed)
    else:  # the interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest): one bf16 ulp apart at most
        ulp = summed.float().abs() * 2.0**-7
        assert ((xr.float() - summed.float()).abs() <= ulp).all()
    assert_close_to_ref("add_rms_norm_", out, rms_norm_ref(summed, w, eps), rms_norm_ref(summed.double(), w.double(),
                                                                                         eps), atol=atol)
    T, D = 7, 10  # head_dim 10: a half of 5, not a power of two
    q = torch.randn(T, 3, D, generator=g).to(dtype)
    k = torch.randn(T, 1, D, generator=g).to(dtype)
    angles = torch.randn(T, D // 2, generator=g) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, D] fp32 tables
    # fp64 reference from the tables as the kernel sees them (rounded to the activation dtype first).
    cos64, sin64 = cos.to(dtype).double(), sin.to(dtype).double()
    expected = [(rotary_ref(t.double(), cos64, sin64), rotary_ref(t, cos, sin)) for t in (q, k)]
    rotary_(q, k, cos, sin)
    for name, ours, (ref, naive) in zip(("q", "k"), (q, k), expected):
        assert_close_to_ref(f"rotary_ {name}", ours, naive, ref, atol=(2e-6 + trunc) * ref.abs().max().item())
    gate, up = (torch.randn(*shape, generator=g) * 4).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    ref64 = silu_mul_ref(gate.double(), up.double())
    naive = silu_mul_ref(gate, up)
    assert silu_mul_(gate, up) is gate
    assert_close_to_ref("silu_mul_", gate, naive, ref64, atol=(2e-6 + trunc) * ref64.abs().max().item())
    assert calls == ["_rms_norm_kernel", "_rms_norm_kernel", "_rotary_kernel", "_rotary_kernel", "_silu_mul_kernel"]
