"""dash_kernels.sample_rows (the C++ kernel on fp32 CPU) against its torch reference and against exact properties.

Against the reference: tests/kernels/sample_testing.py (shared with the Triton kernel's interpreter cases), without
and with top-k / top-p. Distribution: u on a uniform grid must hit each token in proportion to its probability
(inverse CDF is exact up to one grid step per token). The top-k / top-p reference (`filter_threshold_ref`) against a
brute-force reading of its definition, ties included.
"""

import math

import pytest
import torch

import dash_kernels
from dash_kernels import backend
from dash_kernels.sample_rows import filter_threshold_ref, sample_rows, sample_rows_ref
from tests.kernels.sample_testing import check_against_reference, check_sampled_rows, filter_inputs, sample_inputs

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

# V: one token, not a multiple of the 8 lanes, the tiny model's 48, more than one 256-token block, a 32k vocabulary.
VOCABS = [1, 7, 48, 300, 1000, 32000]


@pytest.mark.parametrize("V", VOCABS)
def test_kernel_matches_reference(V):
    check_against_reference(V)


@pytest.mark.parametrize("V", VOCABS)
def test_kernel_with_top_k_top_p_matches_reference(V):
    check_against_reference(V, filters=True)


def _threshold_brute_force(x, k, p):
    """The module docstring's definition read literally, one row of fp64 values at a time (no sort)."""
    vals = [v for v in x.tolist()]
    tau_k = sorted(vals, reverse=True)[min(k, len(vals)) - 1] if k > 0 else float("-inf")
    if p >= 1:
        return tau_k
    m = max(vals)
    kept = [v for v in vals if v >= tau_k]
    z = sum(math.exp(v - m) for v in kept)
    keep_p = [v for v in kept if sum(math.exp(w - m) for w in kept if w > v) / z < p]
    return max(tau_k, min(keep_p))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_reference_matches_its_definition_with_ties(seed):
    """Integer-valued logits (many ties): top-k keeps every token tied with the k-th value, top-p whole groups."""
    g = torch.Generator().manual_seed(seed)
    B, V = 40, 37
    x = torch.randint(-4, 5, (B, V), generator=g).float() * 0.75
    top_k, top_p = torch.randint(0, 12, (B,), generator=g), torch.tensor([1.0, 0.3, 0.77, 0.95])[torch.arange(B) % 4]
    tau = filter_threshold_ref(x, top_k, top_p)
    for b in range(B):
        assert tau[b].item() == _threshold_brute_force(x[b].double(), int(top_k[b]), float(top_p[b])), b
    # Ties at the k-th value are kept: more than k tokens survive where the k-th value repeats.
    kept = (x >= tau[:, None]).sum(1)
    assert ((kept > top_k) & (top_k > 0) & (top_p == 1)).any()


def test_kernel_keeps_the_same_tied_tokens_as_the_reference():
    """With ties the kept set (and so every log-prob) equals the reference's exactly: the threshold depends on the
    values only. Integer-valued logits: every row has ties at its k-th value."""
    logits, temperature, u, stop_ids, active = sample_inputs(128, 300, seed=4)
    logits = logits.round()
    top_k, top_p = filter_inputs(128, seed=4)
    tokens, logp = sample_rows(logits, temperature, u, stop_ids, active, top_k, top_p)
    check_sampled_rows(logits, temperature, u, stop_ids, active, tokens, logp, top_k, top_p)


def test_top_k_top_p_off_values_equal_no_filter():
    """top_k 0 and top_p 1 on every row: the same bits as the op without filters."""
    inputs = sample_inputs(64, 300, seed=6)
    plain = sample_rows(*inputs)
    off = sample_rows(*inputs, torch.zeros(64, dtype=torch.long), torch.ones(64))
    assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])


def test_top_k_one_is_a_point_mass_at_the_argmax():
    logits, temperature, u, stop_ids, active = sample_inputs(64, 1000, seed=7)
    tokens, logp = sample_rows(logits, temperature, u, stop_ids, active, torch.ones(64, dtype=torch.long),
                               torch.full((64,), 0.9))
    greedy, _ = sample_rows(logits, torch.zeros(64), u, stop_ids, active)
    assert torch.equal(tokens, greedy) and torch.equal(logp, torch.zeros(64))


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
    logits, temperature, u, stop_ids, active = sample_inputs(300, 1000, seed=5)
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
    logits, temperature, u, stop_ids, active = sample_inputs(16, 48, seed=2)
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
    (dict(top_k=torch.tensor([1, -1]), top_p=torch.ones(2)), "top_k must be >= 0"),
    (dict(top_k=torch.ones(2, dtype=torch.long), top_p=torch.tensor([1.0, 0.0])), "top_p must be in \\(0, 1\\]"),
    (dict(top_k=torch.ones(2, dtype=torch.int32), top_p=torch.ones(2)), "top_k must be"),
    (dict(top_k=torch.ones(2, dtype=torch.long)), "top_k and top_p together"),
])
def test_bad_inputs_name_the_argument(bad, message):
    args = dict(logits=torch.zeros(2, 4), temperature=torch.ones(2), u=torch.full((2,), 0.5, dtype=torch.float64),
                stop_ids=torch.zeros(2, 1, dtype=torch.long), stop_active=torch.zeros(2, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        torch.ops.dash.sample_rows(**args)
