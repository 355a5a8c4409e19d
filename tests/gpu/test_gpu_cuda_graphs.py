"""CUDA-graph decode steps (dash/engine/cuda_graphs.py) on a CUDA device (issue 22 item 3).

Criteria:
- bitwise: a replayed graph computes what its captured function computes eagerly. The reference is the same bucket
  path without capture (`force_eager_buckets`): same kernels on the same shapes, so the tokens, log-probs and KV pages
  of a whole `generate` call must be identical, for batches that fill a bucket, batches padded to one, and (with
  MAX_GRAPH_BATCH lowered) batches above the largest bucket, which run eagerly in both runs. The pages also show that
  the capture's warm-up on padding rows wrote nothing.
- against the plain eager path (cuda_graphs=False), fp32 with TF32 off: the same tokens, log-probs within LOGP_ATOL.
  Not bitwise: the bucket path runs the GEMMs on n >= B rows and paged attention with the call's widest page table
  (another split-K choice), so sums may be ordered differently. LOGP_ATOL is the bound the engine already holds
  between two fp32 computations of a log-prob by different kernels (sampler vs trainer recomputation,
  tests/engine/test_engine.py); not measured on a GPU yet. bf16 is compared bitwise only: there a one-ulp change
  of an activation can flip a sampled token and part the sequences.
- host syncs: with graphs on, every decode step runs under torch.cuda.set_sync_debug_mode("error")
  (tests/gpu/test_gpu_host_syncs.py's fixture); the capture itself synchronises, in ModelRunner.prepare, outside.
Written and collected here, skipped without a GPU: not run yet.
"""

import pytest
import torch

import dash.engine.cuda_graphs as cg
from dash.engine import SamplingParams, generate
from dash.engine.kv_cache import KVCache
from tests.engine.conftest import build_pair, random_prompts
from tests.gpu.test_gpu_host_syncs import PARAMS as SYNC_PARAMS
from tests.gpu.test_gpu_host_syncs import sync_checked_decode_steps  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
LOGP_ATOL = 1e-4
# 5 prompts x 3 samples; requests end after 2..6 tokens, so decode batches are 15, 12, 9, 6 (with buckets
# 1, 2, 4, 8, 15: one full bucket, then rows padded to 15, 15 and 8).
PROMPT_LENS = [5, 17, 9, 30, 3]
MAX_NEW = [2, 3, 4, 6, 6]


def _params(temperature):
    return [SamplingParams(temperature=temperature, top_k=50, max_new_tokens=m, seed=i, stop_token_ids=[])
            for i, m in enumerate(MAX_NEW)]


def _run(model, monkeypatch, params, mode: str):
    """generate in `mode` ("graphs", "eager-buckets" or "eager"); returns (completions, stats, pools, captured)."""
    monkeypatch.setattr(cg, "force_eager_buckets", mode == "eager-buckets")
    pools, captured, recycle, prepare = [], [], KVCache.recycle, cg.DecodeGraphs.prepare

    def keep_pool(self):
        pools.append([t.clone() for t in (*self.k, *self.v)])
        recycle(self)

    def spy_prepare(self, batch):
        prepare(self, batch)
        captured[:] = sorted(self.graphs) if self.capture else []

    monkeypatch.setattr(KVCache, "recycle", keep_pool)
    monkeypatch.setattr(cg.DecodeGraphs, "prepare", spy_prepare)
    stats = {}
    outs = generate(model, None, random_prompts(PROMPT_LENS), n=3, params=params, page_size=4, stats=stats,
                    cuda_graphs=mode != "eager")
    comps = [(c.token_ids, c.logprobs) for group in outs for c in group.completions]
    return comps, stats, pools[0], captured


@pytest.fixture(scope="module")
def model_cpu(tmp_path_factory):
    return build_pair("qwen2", tmp_path_factory.mktemp("qwen2"))[1]


@pytest.mark.parametrize("max_graph_batch", [cg.MAX_GRAPH_BATCH, 8], ids=["all-in-buckets", "above-largest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_is_bitwise_the_uncaptured_bucket_step(dtype, max_graph_batch, model_cpu, monkeypatch):
    model = model_cpu.to(device=CUDA, dtype=dtype)
    monkeypatch.setattr(cg, "MAX_GRAPH_BATCH", max_graph_batch)
    graphs, stats, pool, captured = _run(model, monkeypatch, _params(0.9), "graphs")
    uncaptured, ref_stats, ref_pool, _ = _run(model, monkeypatch, _params(0.9), "eager-buckets")
    expect = [1, 2, 4, 8, 15] if max_graph_batch > 15 else [1, 2, 4, 8]
    assert set(captured) <= set(expect) and captured and max(captured) == (15 if max_graph_batch > 15 else 8)
    assert stats["graph_steps"] == ref_stats["graph_steps"] > 0
    if max_graph_batch == 8:
        assert stats["graph_steps"] < stats["decode_steps"]  # the 15-, 12- and 9-row steps ran eagerly
    assert graphs == uncaptured
    for a, b in zip(pool, ref_pool, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_graphs_match_the_eager_path_fp32(temperature, model_cpu, monkeypatch):
    model = model_cpu.to(device=CUDA, dtype=torch.float32)
    graphs, stats, _, captured = _run(model, monkeypatch, _params(temperature), "graphs")
    eager, eager_stats, _, _ = _run(model, monkeypatch, _params(temperature), "eager")
    assert captured and stats["graph_steps"] == stats["decode_steps"] and eager_stats["graph_steps"] == 0
    assert [t for t, _ in graphs] == [t for t, _ in eager]
    for (_, a), (_, b) in zip(graphs, eager, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=LOGP_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_steps_do_not_sync(dtype, sync_checked_decode_steps, model_cpu):  # noqa: F811
    model = model_cpu.to(device=CUDA, dtype=dtype)
    stats = {}
    outs = generate(model, None, random_prompts([5, 17, 9]), n=2, params=SYNC_PARAMS, page_size=16, stats=stats)
    assert stats["graph_steps"] == stats["decode_steps"] == len(sync_checked_decode_steps) > 0
    assert all(len(c.token_ids) >= SYNC_PARAMS.min_new_tokens for group in outs for c in group)
