"""The Triton sampling kernel's top-k / top-p variants (dash_kernels/sample_rows.py) on CPU, Triton interpreter.

The same checks as the C++ kernel's (tests/kernels/sample_testing.py): every token inside the reference's kept set
and inside its fp64 cdf interval, greedy rows at the argmax, log-probs against the fp64 reference. Rows cover the
running top-k buffer (k <= BLOCK_K), the bisection (k > BLOCK_K, top-p without top-k), ties, and a top-k larger than
the vocabulary. Vocabularies: smaller than one block, 300, and 2500 (three BLOCK_V = 1024 blocks, so the buffer
merges across blocks). Not collected by a plain `pytest` run: test_triton_interpreter.py runs this file with
TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from sample_testing import check_against_reference, check_sampled_rows, filter_inputs, sample_inputs

from dash_kernels import backend
from dash_kernels import sample_rows as sample_module
from dash_kernels.sample_rows import block_k, sample_rows


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """Triton backend forced; returns the list of BLOCK_K constexprs the sampling kernel was launched with."""
    kernel, calls = sample_module._sample_rows_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs["BLOCK_K"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sample_module, "_sample_rows_kernel", Spy())
    with backend.use_backend("triton"):
        yield calls


@pytest.mark.parametrize("V,max_top_k", [(7, None), (300, 64), (300, 5000), (2500, 64)])
def test_filtered_rows_match_reference(V, max_top_k, launches):
    """filter_inputs' k of 50 / 64 use the buffer; 65 / 300 / 5000 bisect under BLOCK_K 64 (max_top_k 5000 is above
    every buffer, so 64 is picked); top-p with k = 0 bisects."""
    check_against_reference(V, B=12, filters=True, max_top_k=max_top_k)
    assert launches == [block_k(max_top_k)] == [64]


def test_ties_keep_the_reference_set(launches):
    """Integer-valued logits: ties at the k-th value and inside top-p groups, in the buffer and by bisection."""
    logits, temperature, u, stop_ids, active = sample_inputs(12, 300, seed=4)
    logits = logits.round()
    top_k, top_p = filter_inputs(12, seed=4)
    tokens, logp = sample_rows(logits, temperature, u, stop_ids, active, top_k, top_p, max_top_k=64)
    check_sampled_rows(logits, temperature, u, stop_ids, active, tokens, logp, top_k, top_p)


def test_filters_off_equal_the_unfiltered_variant(launches):
    """top_k 0 / top_p 1 on every row through the filter variant: the unfiltered variant's bits."""
    inputs = sample_inputs(8, 300, seed=6)
    plain = sample_rows(*inputs)
    off = sample_rows(*inputs, torch.zeros(8, dtype=torch.long), torch.ones(8), max_top_k=0)
    assert launches == [0, 64]
    assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])


def test_engine_with_top_k_top_p_matches_the_cpu_kernel(launches):
    """The sampler end to end with the Triton kernels (interpreted) and top-k / top-p / min-tokens in the filter
    variant: the tokens and log-probs of the C++ path (same seeded uniforms)."""
    from dash.engine import SamplingParams, generate
    from dash.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48,
                                 head_dim=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64))
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_new_tokens=2, max_new_tokens=5,
                            stop_token_ids=[7], seed=3)
    prompts = [[3, 4, 5], list(range(6, 17))]
    triton_out = [o[0] for o in generate(model, None, prompts, params=params, page_size=4)]
    assert launches and set(launches) == {64}
    with backend.use_backend("torch"):
        cpu_out = [o[0] for o in generate(model, None, prompts, params=params, page_size=4)]
    assert [o.token_ids for o in triton_out] == [o.token_ids for o in cpu_out]
    for a, b in zip(triton_out, cpu_out):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
