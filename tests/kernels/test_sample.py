"""dash_kernels.sample_rows (the C++ kernel on fp32 CPU) against its torch reference and against exact properties.

Log-probs: kernel_testing's criterion against an fp64 reference at the sampled tokens (both fp32 paths differ from it
by the summation order and exp of the log-sum-exp). Tokens: every sampled token's fp64 cdf interval must contain
u * total (up to BOUNDARY_TOL of the mass), greedy rows take the fp64 argmax, and the torch reference may differ only
on rare rounding calls at a boundary. Distribution: u on a uniform grid must hit each token in proportion to its
probability (inverse CDF is exact up to one grid step per token).
"""

import pytest
import torch

import dash_kernels
from dash_kernels import backend
from dash_kernels.sample import sample_rows, sample_rows_ref
from tests.kernels.kernel_testing import assert_close_to_ref

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

BOUNDARY_TOL = 1e-5  # relative to the total mass: two fp32 cumulative sums of <= 1000 terms differ by far less
# V: one token, not a multiple of the 8 lanes, the tiny model's 48, more than one 256-token block, a 32k vocabulary.
VOCABS = [1, 7, 48, 300, 1000, 32000]


def _inputs(B, V, seed=0, greedy_rows=4, stop_width=3):
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


def _logp64(logits, temperature, stop_ids, active):
    x = logits.double().clone()
    for b in range(x.shape[0]):
        if active[b]:
            ids = stop_ids[b][stop_ids[b] >= 0]
            x[b, ids] = float("-inf")
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double()
    return (x / t[:, None]).log_softmax(dim=1)  # [B, V]


def _in_token_interval(logp64, tokens, u):
    """[B] bool: u * total lies in token's fp64 cdf interval (cdf[t-1], cdf[t]], widened by BOUNDARY_TOL * total."""
    p = logp64.exp()
    cdf = p.cumsum(dim=1)
    total = cdf[:, -1]
    hi = cdf.gather(1, tokens[:, None]).squeeze(1)
    lo = hi - p.gather(1, tokens[:, None]).squeeze(1)
    target = u * total
    return (target > lo - BOUNDARY_TOL * total) & (target <= hi + BOUNDARY_TOL * total)


@pytest.mark.parametrize("V", VOCABS)
def test_kernel_matches_reference(V):
    B = 257
    logits, temperature, u, stop_ids, active = _inputs(B, V)
    tokens, logp = sample_rows(logits, temperature, u, stop_ids, active)
    ref_tokens, _ = sample_rows_ref(logits, temperature, u, stop_ids, active)
    logp64 = _logp64(logits, temperature, stop_ids, active)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logp64[greedy].argmax(dim=1))
    wrong = ~greedy & ~_in_token_interval(logp64, tokens, u)
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


def test_greedy_rows_take_the_first_argmax_of_the_masked_logits():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [9.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    stop_ids = torch.tensor([[-1, -1], [0, -1], [0, 1]])
    active = torch.tensor([False, True, True])
    tokens, logp = sample_rows(logits, torch.zeros(3), torch.full((3,), 0.5, dtype=torch.float64), stop_ids, active)
    assert tokens.tolist() == [1, 2, 2]
    expected = torch.stack([logits[0].log_softmax(0)[1], logits[1, 1:].log_softmax(0)[1],
                            logits[2, 2:].log_softmax(0)[0]])
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)


def test_masked_stop_tokens_are_never_drawn_even_with_almost_all_mass():
    V = 600  # three blocks; the masked tokens fill the end of the vocabulary
    logits = torch.full((64, V), -20.0)
    logits[:, 400:] = 30.0  # all the mass, but masked below
    stop_ids = torch.arange(400, V).expand(64, -1).contiguous()
    u = torch.linspace(1e-9, 1 - 1e-12, 64, dtype=torch.float64)
    tokens, logp = sample_rows(logits, torch.ones(64), u, stop_ids, torch.ones(64, dtype=torch.bool))
    assert (tokens < 400).all()
    torch.testing.assert_close(logp, torch.full((64,), -torch.log(torch.tensor(400.0)).item()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("V", [5, 300])
def test_inverse_cdf_hits_each_token_in_proportion_to_its_probability(V):
    N = 20000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    temperature = torch.tensor([0.7])
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N  # a uniform grid over (0, 1)
    tokens, logp = sample_rows(logits.expand(N, V).contiguous(), temperature.expand(N).contiguous(), u)
    probs = (logits[0].double() / 0.7).softmax(0)
    counts = torch.bincount(tokens, minlength=V).double()
    # A grid of N points puts floor or ceil of N * p_v points in token v's interval: off by at most one per token.
    assert (counts - N * probs).abs().max() <= 1.0 + 1e-6
    # Tokens come out in cdf order as u grows.
    assert (tokens[1:] >= tokens[:-1]).all()
    torch.testing.assert_close(logp, probs.log().float()[tokens], rtol=0, atol=1e-5)


def test_a_row_does_not_depend_on_its_batch_or_the_thread_count():
    logits, temperature, u, stop_ids, active = _inputs(300, 1000, seed=5)
    full = sample_rows(logits, temperature, u, stop_ids, active)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = sample_rows(logits, temperature, u, stop_ids, active)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(full, one_thread):
        assert torch.equal(a, b)
    for r in (0, 7, 150, 299):
        alone = sample_rows(logits[r:r + 1], temperature[r:r + 1], u[r:r + 1], stop_ids[r:r + 1], active[r:r + 1])
        assert alone[0].item() == full[0][r].item() and alone[1].item() == full[1][r].item()


def test_reference_backend_runs_the_torch_path():
    logits, temperature, u, stop_ids, active = _inputs(16, 48, seed=2)
    with backend.use_backend("reference"):
        tokens, logp = sample_rows(logits, temperature, u, stop_ids, active)
    ref = sample_rows_ref(logits, temperature, u, stop_ids, active)
    assert torch.equal(tokens, ref[0]) and torch.equal(logp, ref[1])


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.tensor([0.5, 1.0], dtype=torch.float64)), "u must be in \\(0, 1\\)"),
    (dict(u=torch.tensor([0.5, 0.5], dtype=torch.float32)), "u must be"),
    (dict(temperature=torch.ones(3)), "temperature must be"),
    (dict(stop_ids=torch.zeros(3, 1, dtype=torch.long)), "stop_ids must be"),
    (dict(stop_active=torch.zeros(2, dtype=torch.int64)), "stop_active must be"),
    (dict(logits=torch.zeros(2, 0)), "logits must be"),
])
def test_bad_inputs_name_the_argument(bad, message):
    args = dict(logits=torch.zeros(2, 4), temperature=torch.ones(2), u=torch.full((2,), 0.5, dtype=torch.float64),
                stop_ids=torch.zeros(2, 1, dtype=torch.long), stop_active=torch.zeros(2, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        torch.ops.dash.sample_rows(*args.values())
