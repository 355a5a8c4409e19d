"""The log-prob and policy-loss Triton kernels on a CUDA device against the fp64 reference, at small odd shapes and at
the real one: the fused log-prob forward and backward at N = 16384 tokens, V = 151936 (Qwen2.5's vocabulary),
H = 896 (0.5B's hidden size), fp32 and bf16.

Criterion (tests/kernels/kernel_testing.py): max|ours - fp64| <= 2 * max|fp32 naive - fp64| + atol, NaN / inf
parity. A kernel output stored in a 16-bit dtype (bf16 gradients) is compared with the naive result rounded to that
dtype: the rounding of the output is part of what the low-precision reference costs. At the real shape the
references run in row chunks of REF_CHUNK (the [N, V] fp64 logits alone would be 20 GB).
"""

import pytest
import torch

from dash_kernels import fused_policy_loss, token_logprobs, token_logprobs_from_logits
from dash_kernels.ops import logprobs_from_logits as from_logits_module
from dash_kernels.ops import token_logprobs as tlp_module
from dash_kernels.ops import token_logprobs_bwd as tlp_bwd_module
from dash_kernels.reference import token_logprobs_from_logits_ref, token_logprobs_ref
from tests.kernels.kernel_testing import (
    assert_close_to_ref,
    check_loss_against_ref,
    linear_inputs,
    logprob_runner,
    loss_inputs,
    naive_alt_logprobs,
    run_with_grads,
)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
REAL_N, REAL_H, REAL_V = 16384, 896, 151936
REF_CHUNK = 1024  # rows per reference chunk: fp64 logits of 1024 x 151936 are 1.2 GB, autograd keeps a few


def _cuda(*tensors):
    return [None if t is None else t.to(CUDA) for t in tensors]


def _check_all(names, ours, naives, ref):
    for name, a, ns, r in zip(names, ours, zip(*naives), ref):
        if r is None:
            continue
        assert a is not None, f"{name} missing"
        assert_close_to_ref(name, a, [n.to(a.dtype) for n in ns], r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,bias,temperature", [(37, 31, 123, False, 1.0), (37, 31, 1000, True, 0.7),
                                                    (150, 20, 300, False, 1.0), (129, 64, 4099, True, 1.3)])
def test_token_logprobs_small(dtype, N, H, V, bias, temperature, launches):
    launches.spy(tlp_module, "_token_logprobs_fwd_kernel")
    launches.spy(tlp_bwd_module, "_token_logprobs_bwd_kernel")
    hidden, weight, targets, b = _cuda(*linear_inputs(N, H, V, seed=V, bias=bias, ignore_frac=0.2, dtype=dtype))
    g = torch.Generator().manual_seed(1)
    upstream = _cuda(torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64))
    run = logprob_runner(hidden, weight, targets, b, temperature, True, upstream)
    ours, g_ours = run(token_logprobs)
    naive, g_naive = run(token_logprobs_ref, torch.float32)
    naive2, g_naive2 = run(naive_alt_logprobs, torch.float32)
    ref, g_ref = run(token_logprobs_ref, torch.float64)
    _check_all(("logp", "entropy"), ours, (naive, naive2), ref)
    _check_all(("d_hidden", "d_weight", "d_bias"), g_ours, (g_naive, g_naive2), g_ref)
    assert launches == ["_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"]


def _real_inputs(dtype, seed=0):
    """hidden [N, H], weight [V, H] (logit std ~3, peaked like an LM's), targets drawn from the softmax, 10% ignored;
    built on the GPU in chunks."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    hidden = torch.randn(REAL_N, REAL_H, generator=g, device=CUDA)
    weight = torch.randn(REAL_V, REAL_H, generator=g, device=CUDA) * (3.0 / REAL_H ** 0.5)
    targets = torch.empty(REAL_N, dtype=torch.long, device=CUDA)
    for lo in range(0, REAL_N, REF_CHUNK):
        probs = torch.softmax(hidden[lo:lo + REF_CHUNK] @ weight.t(), -1)
        targets[lo:lo + REF_CHUNK] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    targets[torch.rand(REAL_N, generator=g, device=CUDA) < 0.1] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _chunked(fn, hidden, weight, targets, upstream, dtype):
    """fn (a token_logprobs-shaped reference) computed in `dtype`, REF_CHUNK rows at a time, with the gradients of
    sum(logp * upstream[0] + entropy * upstream[1]). Returns ((logp, entropy), (d_hidden, d_weight))."""
    w = weight.detach().to(dtype).requires_grad_()
    logp = torch.empty(REAL_N, dtype=dtype, device=CUDA)
    entropy, dh = torch.empty_like(logp), torch.empty(REAL_N, REAL_H, dtype=dtype, device=CUDA)
    for lo in range(0, REAL_N, REF_CHUNK):
        rows = slice(lo, lo + REF_CHUNK)
        h = hidden[rows].detach().to(dtype).requires_grad_()
        lp, ent = fn(h, w, targets[rows], return_entropy=True, dtype=dtype)
        ((lp * upstream[0][rows].to(dtype)).sum() + (ent * upstream[1][rows].to(dtype)).sum()).backward()
        logp[rows], entropy[rows], dh[rows] = lp.detach(), ent.detach(), h.grad
    return (logp, entropy), (dh, w.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_real_shape_forward_and_backward(dtype, launches):
    """N = 16384, V = 151936, H = 896: the shape of a DASH micro-batch of Qwen2.5-0.5B."""
    launches.spy(tlp_module, "_token_logprobs_fwd_kernel")
    launches.spy(tlp_bwd_module, "_token_logprobs_bwd_kernel")
    hidden, weight, targets = _real_inputs(dtype)
    g = torch.Generator(device=CUDA).manual_seed(1)
    upstream = [torch.randn(REAL_N, generator=g, device=CUDA, dtype=torch.float64) for _ in range(2)]
    ours, g_ours = run_with_grads(lambda h, w: token_logprobs(h, w, targets, return_entropy=True),
                                  [hidden, weight], upstream)
    # The backward runs vocab chunk by vocab chunk (token_logprobs_bwd.backward_plan): one dz launch per chunk.
    n_chunks = tlp_bwd_module.backward_plan(int((targets != -100).sum()), REAL_V, REAL_H, dtype,
                                            tlp_bwd_module.num_programs_target(CUDA), False).n_chunks
    assert launches == ["_token_logprobs_fwd_kernel"] + ["_token_logprobs_bwd_kernel"] * n_chunks
    assert g_ours[0].dtype == g_ours[1].dtype == dtype
    naive, g_naive = _chunked(token_logprobs_ref, hidden, weight, targets, upstream, torch.float32)
    naive2, g_naive2 = _chunked(naive_alt_logprobs, hidden, weight, targets, upstream, torch.float32)
    ref, g_ref = _chunked(token_logprobs_ref, hidden, weight, targets, upstream, torch.float64)
    _check_all(("logp", "entropy"), ours, (naive, naive2), ref)
    del naive, naive2
    _check_all(("d_hidden", "d_weight"), g_ours, (g_naive, g_naive2), g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(37, 1000), (2048, REAL_V)])  # 2048 rows of Qwen2.5 logits: a sequence group
def test_logprobs_from_logits(dtype, N, V, launches):
    launches.spy(from_logits_module, "_logprobs_from_logits_fwd_kernel")
    launches.spy(from_logits_module, "_logprobs_from_logits_bwd_kernel")
    g = torch.Generator(device=CUDA).manual_seed(3)
    logits = (torch.randn(N, V, generator=g, device=CUDA) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=CUDA)
    targets[::7] = -100
    upstream = [torch.randn(N, generator=g, device=CUDA, dtype=torch.float64) for _ in range(2)]

    def run(fn, **kw):
        return run_with_grads(lambda z: fn(z, targets, 0.8, True, **kw), [logits], upstream)

    ours, g_ours = run(token_logprobs_from_logits)
    naive, g_naive = run(token_logprobs_from_logits_ref, dtype=torch.float32)
    ref, g_ref = run(token_logprobs_from_logits_ref, dtype=torch.float64)
    assert g_ours[0].dtype == dtype
    _check_all(("logp", "entropy"), ours, (naive,), ref)
    _check_all(("d_logits",), g_ours, (g_naive,), g_ref)
    assert launches == ["_logprobs_from_logits_fwd_kernel", "_logprobs_from_logits_bwd_kernel"]


@pytest.mark.parametrize("kw", [{"loss_type": "dapo"},
                                {"loss_type": "grpo", "beta": 0.04, "adv_threshold": 0.1, "temperature": 0.7},
                                {"loss_type": "dr_grpo", "delta": 1.5, "normalizer": 40.0, "beta": 0.1,
                                 "kl_bias_correction": True, "entropy_coef": 0.01}],
                         ids=lambda kw: kw["loss_type"])
@pytest.mark.parametrize("shape", [(3, 13, 31, 1000, True), (4, 64, REAL_H, REAL_V, False)],
                         ids=["small", "qwen-head"])
def test_fused_policy_loss(kw, shape):
    """fp32 inputs: the criterion then covers the loss, every gradient and the metrics (check_loss_against_ref)."""
    B, L, H, V, bias = shape
    inp = loss_inputs(B, L, H, V, seed=V, bias=bias, per_token_adv=bias)
    inp = {k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    check_loss_against_ref(fused_policy_loss, inp, **kw)
