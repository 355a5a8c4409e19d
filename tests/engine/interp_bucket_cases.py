"""The decode bucket path (dash/engine/cuda_graphs.py) on the Triton kernels, under the interpreter on CPU.

What a CUDA graph replays is `DecodeGraphs._forward_bucket` with the Triton backend: paged attention over padded
rows (context 1, slot -1) with page tables as wide as the call's longest sequence, which changes its split-K choice
against the eager step. Here that function runs uncaptured (`force_eager_buckets`) with every public op on Triton
(fp32: the interpreter's bf16 dots are not a GPU's, see tests/kernels/interp_paged_cases.py), against the eager path.
Not collected by a plain `pytest` run: tests/engine/test_cuda_graph_buckets.py runs it with TRITON_INTERPRET=1.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_cuda_graph_buckets.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

import torch

import dash.engine.cuda_graphs as cg
from dash.engine import SamplingParams, generate
from dash_kernels import backend, paged_attention

LOGP_ATOL = 1e-5  # as tests/engine/test_cuda_graph_buckets.py: a few ulp of fp32 log-probs in [-10, 0]


def test_bucket_path_on_triton_kernels(model_pair, make_prompts, monkeypatch):
    assert backend.resolve(torch.device("cpu")) == "triton"
    _, model = model_pair("qwen2")
    prompts = make_prompts([5, 17, 9, 12, 3])
    # Rows finish after 2..6 tokens: batches 5, 4, 3 (bucket 4: one padding row), 2.
    params = [SamplingParams(temperature=0.9, max_new_tokens=m, seed=i, stop_token_ids=[])
              for i, m in enumerate([2, 3, 4, 6, 6])]
    launches, fwd = [], paged_attention.paged_attention_fwd

    def spy(q, *args, **kwargs):
        launches.append(q.shape[0])
        return fwd(q, *args, **kwargs)

    monkeypatch.setattr(paged_attention, "paged_attention_fwd", spy)
    runs = []
    for forced in (False, True):
        monkeypatch.setattr(cg, "force_eager_buckets", forced)
        stats = {}
        launches.clear()
        outs = generate(model, None, prompts, params=params, page_size=4, stats=stats)
        runs.append(([(c.token_ids, c.logprobs) for group in outs for c in group.completions], stats,
                     sorted(set(launches))))
    (eager, eager_stats, eager_rows), (padded, stats, rows) = runs
    assert eager_stats["graph_steps"] == 0 and stats["graph_steps"] == stats["decode_steps"] > 0
    assert eager_rows == [2, 3, 4, 5] and rows == [2, 4, 5]  # the Triton kernel ran the 3-row step padded to 4
    assert [t for t, _ in padded] == [t for t, _ in eager]
    for (_, a), (_, b) in zip(padded, eager, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=LOGP_ATOL)
