"""Checks shared by the sampling kernels' tests (test_sample.py: the C++ kernel; interp_cases.py and
interp_sample_cases.py: the Triton kernel).

Kept set (top-k / top-p): the tokens with x >= the fp32 reference threshold (`filter_threshold_ref`); every sampled
token must be in it. Log-probs: kernel_testing's criterion against an fp64 log_softmax over that kept set at the
sampled tokens (the fp32 paths differ from it by the summation order and exp of the log-sum-exp). Tokens: every
sampled token's fp64 cdf interval must contain u * total (up to BOUNDARY_TOL of the mass), greedy rows take the fp64
argmax, and the torch reference may differ only on rare rounding calls at a boundary.
"""

import torch

from dash_kernels.sample_rows import filter_threshold_ref, sample_rows, sample_rows_ref
from tests.kernels.kernel_testing import assert_close_to_ref

BOUNDARY_TOL = 1e-5  # of the total mass: fp32 block-summed and fp64 cumulative sums of <= 32k terms differ far less


def sample_inputs(B, V, seed=0, greedy_rows=4, stop_width=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    temperature = torch.rand(B, generator=g) * 1.5 + 0.2
    temperature[:greedy_rows] = 0
    u = torch.rand(B, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    stop_ids = torch.randint(-1, V, (B, stop_width), generator=g)
    active = torch.rand(B, generator=g) < 0.5
    if V == 1:
        active[:] = False  # masking the only token leaves nothing to sample
    return logits, temperature, u, stop_ids, active


def filter_inputs(B, seed=0):
    """top_k [B] and top_p [B]: off, small, the presets' 50, the Triton buffer's 64 and one past it, larger than a
    buffer, larger than small vocabularies; top_p off, or 0.9 / 0.6, with and without top-k."""
    ks = torch.tensor([0, 1, 3, 50, 64, 65, 300, 5000])
    ps = torch.tensor([1.0, 0.9, 0.6])  # coprime cycle lengths: 24 rows hold every (k, p) pair
    rows = torch.arange(B) + seed
    return ks[rows % len(ks)], ps[rows % len(ps)]


def _masked_x(logits, temperature, stop_ids, active, dtype):
    x = logits.to(dtype).clone()
    for b in range(x.shape[0]):
        if active[b]:
            ids = stop_ids[b][stop_ids[b] >= 0]
            x[b, ids] = float("-inf")
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(dtype)
    return x / t[:, None]  # [B, V]


def logp64_ref(logits, temperature, stop_ids, active, top_k=None, top_p=None):
    """fp64 processed log-probs [B, V]; the kept set is the fp32 reference's (a threshold is a rounding call)."""
    x = _masked_x(logits, temperature, stop_ids, active, torch.float64)
    if top_k is not None:
        x32 = _masked_x(logits, temperature, stop_ids, active, torch.float32)
        x = x.masked_fill(x32 < filter_threshold_ref(x32, top_k, top_p)[:, None], float("-inf"))
    return x.log_softmax(dim=1)  # [B, V]


def in_token_interval(logp64, tokens, u):
    """[B] bool: u * total lies in token's fp64 cdf interval (cdf[t-1], cdf[t]], widened by BOUNDARY_TOL * total."""
    p = logp64.exp()
    cdf = p.cumsum(dim=1)
    total = cdf[:, -1]
    hi = cdf.gather(1, tokens[:, None]).squeeze(1)
    lo = hi - p.gather(1, tokens[:, None]).squeeze(1)
    target = u * total
    return (target > lo - BOUNDARY_TOL * total) & (target <= hi + BOUNDARY_TOL * total)


def check_against_reference(V, B=257, filters=False, max_top_k=None):
    """The public sample_rows (whichever kernel the backend picks) on random rows: see the module docstring."""
    inputs = sample_inputs(B, V)
    top = filter_inputs(B) if filters else (None, None)
    check_sampled_rows(*inputs, *sample_rows(*inputs, *top, max_top_k=max_top_k), *top)


def check_sampled_rows(logits, temperature, u, stop_ids, active, tokens, logp, top_k=None, top_p=None):
    """The checks of the module docstring on one kernel's (tokens, logp) for these CPU inputs (outputs on the CPU)."""
    B, V = logits.shape
    ref_tokens, _ = sample_rows_ref(logits, temperature, u, stop_ids, active, top_k, top_p)
    logp64 = logp64_ref(logits, temperature, stop_ids, active, top_k, top_p)
    kept = torch.isfinite(logp64.gather(1, tokens[:, None]).squeeze(1))
    assert kept.all(), f"rows {(~kept).nonzero().flatten()[:5].tolist()}: token outside the reference's kept set"
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logp64[greedy].argmax(dim=1))
    wrong = ~greedy & ~in_token_interval(logp64, tokens, u)
    assert not wrong.any(), f"rows {wrong.nonzero().flatten()[:5].tolist()}: token outside its fp64 cdf interval"
    # The reference differs only on rounding calls at a boundary: rare.
    assert int((tokens != ref_tokens).sum()) <= B // 50
    # Log-probs at the kernel's tokens: fp32 reference and fp64 reference evaluated at the same tokens.
    x32 = _masked_x(logits, temperature, stop_ids, active, torch.float32)
    if top_k is not None:
        x32 = x32.masked_fill(x32 < filter_threshold_ref(x32, top_k, top_p)[:, None], float("-inf"))
    naive = x32.log_softmax(dim=1).gather(1, tokens[:, None]).squeeze(1)
    assert_close_to_ref(f"sample_rows logp V={V}", logp, naive, logp64.gather(1, tokens[:, None]).squeeze(1))
    assert torch.isfinite(logp).all()
