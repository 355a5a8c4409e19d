"""The Triton sampling kernel's top-k / top-p variant on a CUDA device against the reference (sample_testing's
criterion: tokens inside the reference's kept set and fp64 cdf interval, log-probs against fp64), at odd vocabularies
and at Qwen2.5's 151936, with the presets' max_top_k = 50 (rows above the 64-entry buffer bisect) and integer-valued
logits (ties at the k-th value and inside top-p groups). Interpreter twin: tests/kernels/interp_sample_cases.py.
"""

import pytest
import torch

from dash_kernels import sample_rows as sample_module
from dash_kernels.sample_rows import sample_rows
from tests.kernels.sample_testing import check_sampled_rows, filter_inputs, sample_inputs

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("V,B", [(7, 33), (2500, 257), (151936, 64)])  # 151936: Qwen2.5's vocabulary
def test_filtered_sample_rows(V, B, ties, launches):
    launches.spy(sample_module, "_sample_rows_kernel")
    logits, temperature, u, stop_ids, active = sample_inputs(B, V)
    if ties:
        logits = logits.round()
    top_k, top_p = filter_inputs(B)
    inputs = (logits, temperature, u, stop_ids, active, top_k, top_p)
    tokens, logp = sample_rows(*(t.to(CUDA) for t in inputs), max_top_k=50)
    assert launches == ["_sample_rows_kernel"]
    check_sampled_rows(logits, temperature, u, stop_ids, active, tokens.cpu(), logp.cpu(), top_k, top_p)
