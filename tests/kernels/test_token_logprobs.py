"""token_logprobs / token_logprobs_from_logits on the chunked torch backend vs the fp64 reference."""

import pytest
import torch
from kernel_testing import assert_close_to_ref, linear_inputs, logprob_runner, naive_alt_logprobs, run_with_grads

from dash_kernels import token_logprobs, token_logprobs_from_logits
from dash_kernels.ops import _chunked
from dash_kernels.reference import token_logprobs_from_logits_ref, token_logprobs_ref


def _check_linear(N, H, V, temperature, bias, entropy, ignore_frac, seed=0):
    hidden, weight, targets, b = linear_inputs(N, H, V, seed=seed, bias=bias, ignore_frac=ignore_frac)
    g = torch.Generator().manual_seed(seed + 7)
    upstream = [torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)]
    run = logprob_runner(hidden, weight, targets, b, temperature, entropy, upstream)

    (ours, g_ours), (naive, g_naive), (ref, g_ref) = (run(token_logprobs), run(token_logprobs_ref, torch.float32),
                                                       run(token_logprobs_ref, torch.float64))
    naive_p, g_naive_p = run(naive_alt_logprobs, torch.float32)
    for name, a, n, n_p, r in zip(("logp", "entropy"), ours, naive, naive_p, ref):
        assert a.dtype == torch.float32
        assert_close_to_ref(name, a, [n, n_p], r)
    for name, a, n, n_p, r in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_naive, g_naive_p, g_ref):
        if r is not None:
            assert_close_to_ref(name, a, [n, n_p], r)
    ignored = targets == -100
    assert (ours[0][ignored] == 0).all() and (g_ours[0][ignored] == 0).all()


@pytest.mark.parametrize("V", [123, 1000])
@pytest.mark.parametrize("temperature,bias,entropy", [(1.0, False, False), (0.7, True, True), (1.3, False, True)])
def test_token_logprobs_matches_reference(torch_backend, chunking, V, temperature, bias, entropy):
    _check_linear(37, 31, V, temperature, bias, entropy, ignore_frac=0.2)


@pytest.mark.slow
def test_token_logprobs_realistic_vocab(torch_backend):
    """Qwen2.5's vocabulary (H kept small so the fp64 reference stays cheap): real vocab-sized tiles."""
    _check_linear(40, 128, 151936, 1.0, False, True, ignore_frac=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_from_logits_matches_reference(torch_backend, dtype, entropy):
    g = torch.Generator().manual_seed(3)
    N, V = 41, 1000
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    upstream = [torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)]

    def run(fn, **kw):
        def f(z):
            out = fn(z, targets, 0.8, entropy, **kw)
            return out if entropy else (out,)
        return run_with_grads(f, [logits], upstream)

    (ours, g_ours), (naive, g_naive), (ref, g_ref) = (run(token_logprobs_from_logits),
                                                       run(token_logprobs_from_logits_ref, dtype=torch.float32),
                                                       run(token_logprobs_from_logits_ref, dtype=torch.float64))
    for name, a, n, r in zip(("logp", "entropy"), ours, naive, ref):
        assert_close_to_ref(name, a, n, r)
    assert g_ours[0].dtype == dtype  # the gradient is written in the logits' dtype, no fp32 N x V copy
    # bf16 gradients are rounded on the way out; judge them against the naive path rounded the same way.
    assert_close_to_ref("d_logits", g_ours[0], g_naive[0].to(dtype), g_ref[0])


def test_backward_skips_rows_without_gradient(torch_backend, monkeypatch):
    """Rows whose upstream gradient is exactly zero are not recomputed: the sweep sees only the live rows."""
    hidden, weight, targets, _ = linear_inputs(40, 16, 200, seed=1)
    seen = []
    real = _chunked.sweep

    def spy(*args, **kw):
        seen.append(None if args[4] is None else args[4].numel())
        return real(*args, **kw)

    monkeypatch.setattr(_chunked, "sweep", spy)
    h = hidden.clone().requires_grad_()
    logp = token_logprobs(h, weight, targets)
    upstream = torch.zeros(40)
    upstream[:10] = 1.0
    (logp * upstream).sum().backward()
    assert seen == [None, 10]  # forward on all 40 rows, backward on the 10 live ones
    assert (h.grad[10:] == 0).all() and (h.grad[:10] != 0).any()


def test_leading_dims_and_shapes(torch_backend):
    hidden, weight, targets, _ = linear_inputs(2 * 3 * 5, 8, 50)
    out, ent = token_logprobs(hidden.reshape(2, 3, 5, 8), weight, targets.reshape(2, 3, 5), return_entropy=True)
    assert out.shape == ent.shape == (2, 3, 5)
    flat = token_logprobs(hidden, weight, targets)
    assert torch.allclose(out.reshape(-1), flat)


@pytest.mark.slow
def test_int64_offsets_chunked_path(torch_backend):
    """N * V > 2**31 through the chunked path (forward; the index math is per-row slices and gather)."""
    V, N, H = 65536, 32769, 2
    assert N * V > 2**31
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets)
    for rows in (torch.arange(0, 4), torch.arange(N - 4, N)):
        ref = token_logprobs_ref(hidden[rows], weight, targets[rows], dtype=torch.float64)
        assert torch.allclose(logp[rows].double(), ref, atol=1e-4), (logp[rows], ref)


def test_empty_inputs(torch_backend):
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    logp, ent = token_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8) and (w.grad == 0).all()
    assert token_logprobs(torch.randn(2, 0, 8), w, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert token_logprobs_from_logits(torch.randn(0, 20), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_bf16_inputs(torch_backend, monkeypatch):
    """16-bit hidden/weight: fp32 log-probs (the weight is upcast block by block), gradients back in bf16."""
    from dash_kernels.ops import _chunked
    monkeypatch.setattr(_chunked, "_WEIGHT_BLOCK", 700)  # several weight blocks at V = 2000
    hidden, weight, targets, _ = linear_inputs(40, 32, 2000, seed=4, dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = token_logprobs(h, w, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref, ref_ent = token_logprobs_ref(h64, w64, targets, return_entropy=True, dtype=torch.float64)
    (ref.sum() + ref_ent.sum()).backward()
    assert logp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert (logp.double() - ref).abs().max() < 1e-5 and (ent.double() - ref_ent).abs().max() < 1e-5
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):  # one bf16 rounding of an fp32-accumulated value
        assert ((got.double() - want).abs() <= 2.0**-8 * want.abs() + 1e-3 * want.abs().max()).all()
