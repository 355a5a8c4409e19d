"""Checks shared by the sampling kernels' tests (test_sample.py: the C++ kernel; interp_cases.py: the Triton kernel).

Log-probs: kernel_testing's criterion against an fp64 reference at the sampled tokens (the fp32 paths differ from it
by the summation order and exp of the log-sum-exp). Tokens: every sampled token's fp64 cdf interval must contain
u * total (up to BOUNDARY_TOL of the mass), greedy rows take the fp64 argmax, and the torch reference may differ only
on rare rounding calls at a boundary.
"""

import torch

from dash_kernels.sample import sample_rows, sample_rows_ref
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


def logp64_ref(logits, temperature, stop_ids, active):
    x = logits.double().clone()
    for b in range(x.shape[0]):
        if active[b]:
            ids = stop_ids[b][stop_ids[b] >= 0]
            x[b, ids] = float("-inf")
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double()
    return (x / t[:, None]).log_softmax(dim=1)  # [B, V]


def in_token_interval(logp64, tokens, u):
    """[B] bool: u * total lies in token's fp64 cdf interval (cdf[t-1], cdf[t]], widened by BOUNDARY_TOL * total."""
    p = logp64.exp()
    cdf = p.cumsum(dim=1)
    total = cdf[:, -1]
    hi = cdf.gather(1, tokens[:, None]).squeeze(1)
    lo = hi - p.gather(1, tokens[:, None]).squeeze(1)
    target = u * total
    return (target > lo - BOUNDARY_TOL * total) & (target <= hi + BOUNDARY_TOL * total)


def check_against_reference(V, B=257):
    """The public sample_rows (whichever kernel the backend picks) on random rows: see the module docstring."""
    inputs = sample_inputs(B, V)
    check_sampled_rows(*inputs, *sample_rows(*inputs))


def check_sampled_rows(logits, temperature, u, stop_ids, active, tokens, logp):
    """The checks of the module docstring on one kernel's (tokens, logp) for these CPU inputs (outputs on the CPU)."""
    B, V = logits.shape
    ref_tokens, _ = sample_rows_ref(logits, temperature, u, stop_ids, active)
    logp64 = logp64_ref(logits, temperature, stop_ids, active)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logp64[greedy].argmax(dim=1))
    wrong = ~greedy & ~in_token_interval(logp64, tokens, u)
    assert not wrong.any(), f"rows {wrong.nonzero().flatten()[:5].tolist()}: token outside its fp64 cdf interval"
    # The reference differs only on rounding calls at a boundary: rare.
    assert int((tokens != ref_tokens).sum()) <= B // 50
    # Log-probs at the kernel's tokens: fp32 reference and fp64 reference evaluated at the same tokens.
    x32 = logits.clone()
    masked = active[:, None] & (stop_ids >= 0)
    rows = masked.nonzero()[:, 0]
    x32[rows, stop_ids[masked]] = float("-inf")
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    naive = (x32 / t[:, None]).log_softmax(dim=1).gather(1, tokens[:, None]).squeeze(1)
    assert_close_to_ref(f"sample_rows logp V={V}", logp, naive, logp64.gather(1, tokens[:, None]).squeeze(1))
    assert torch.isfinite(logp).all()
