"""dash_kernels.sample_rows (the C++ kernel on fp32 CPU) against its torch reference and against exact properties.

Against the reference: tests/kernels/sample_testing.py (shared with the Triton kernel's interpreter cases).
Distribution: u on a uniform grid must hit each token in proportion to its probability (inverse CDF is exact up to
one grid step per token).
"""

import pytest
import torch

import dash_kernels
from dash_kernels import backend
from dash_kernels.sample import sample_rows, sample_rows_ref
from tests.kernels.sample_testing import check_against_reference, sample_inputs

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

# V: one token, not a multiple of the 8 lanes, the tiny model's 48, more than one 256-token block, a 32k vocabulary.
VOCABS = [1, 7, 48, 300, 1000, 32000]


@pytest.mark.parametrize("V", VOCABS)
def test_kernel_matches_reference(V):
    check_against_reference(V)


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
])
def test_bad_inputs_name_the_argument(bad, message):
    args = dict(logits=torch.zeros(2, 4), temperature=torch.ones(2), u=torch.full((2,), 0.5, dtype=torch.float64),
                stop_ids=torch.zeros(2, 1, dtype=torch.long), stop_active=torch.zeros(2, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        torch.ops.dash.sample_rows(*args.values())
