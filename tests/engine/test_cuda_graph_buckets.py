"""The CUDA-graph bucket path of decode steps (dash/engine/cuda_graphs.py), run eagerly on CPU.

On CUDA a decode step of B rows replays the graph of the smallest bucket n >= B, captured from
`DecodeGraphs._forward_bucket`: the runner's forward over static buffers whose rows [B, n) are padding.
`cuda_graphs.force_eager_buckets` runs that same function without capture, so these tests check on CPU what the
graph computes against the plain eager path: bitwise the same tokens, log-probs and KV pages when every step fills its
bucket (identical shapes), and with padding rows the same tokens, log-probs within LOGP_ATOL and pages within
KV_ATOL (see there why not bitwise); a padding row that wrote a live page is caught. Also: the bucket choice, the
eager fallback above the largest bucket, the switch, no host read of a step tensor, no reference cycle, and the
capture / replay control flow with torch.cuda's graph API faked. The real replay is tests/gpu/test_gpu_cuda_graphs.py
(CUDA only); the same path on the Triton kernels runs under the interpreter
(interp_bucket_cases.py, through test_bucket_path_under_the_triton_interpreter).
"""

import contextlib
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import dash.engine.cuda_graphs as cg
import dash.engine.generation as sampler_mod
from dash.engine import SamplingParams, generate
from dash.engine.kv_cache import Context, KVCache, release_cpu_pool
from dash.engine.runner import ModelRunner
from dash_kernels import backend
from tests.engine.test_host_syncs import HostReadTracer

# Stop id 2 ends some rows early, so batches shrink between buckets and padding rows are exercised.
PARAMS = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_new_tokens=2, max_new_tokens=14, seed=5,
                        stop_token_ids=[2, 7])
PROMPT_LENS = [5, 17, 9, 30, 3]
# With padding, a step's GEMMs run on the bucket's n rows instead of B: the BLAS may block (and so sum) a row's
# products differently for another row count (MKL here: rows of an M = 3 product differ from the same rows of an
# M = 4 one in the last bits), and rounding then differs by a few ulp. fp32 log-probs here lie in [-10, 0], where an
# ulp is <= 9.5e-7: 1e-5 allows ~10 ulp (measured: 1.9e-6); K/V values are O(1): 1e-5 absolute. The fault these
# tests guard against (a padding row storing into a live page) moves log-probs and pages by O(1).
LOGP_ATOL = 1e-5
KV_ATOL = 1e-5
INTERPRETER_TIMEOUT_S = 600


def _run(model, prompts, monkeypatch, forced: bool, n: int = 3, **kwargs):
    """generate with the bucket path forced (or not); returns (outputs, stats, [(B, bucket)] of bucket steps,
    the KV pools [k list, v list] as the call left them)."""
    monkeypatch.setattr(cg, "force_eager_buckets", forced)
    steps, pools = [], []
    forward, recycle = cg.DecodeGraphs.forward, KVCache.recycle

    def spy_forward(self, ctx, bucket):
        steps.append((ctx.input_ids.shape[0], bucket))
        return forward(self, ctx, bucket)

    def keep_pool(self):
        pools.append(([k.clone() for k in self.k], [v.clone() for v in self.v]))
        recycle(self)

    monkeypatch.setattr(cg.DecodeGraphs, "forward", spy_forward)
    monkeypatch.setattr(KVCache, "recycle", keep_pool)
    stats = {}
    release_cpu_pool()  # both runs start from a zeroed pool, not from the pages the other run left
    outs = generate(model, None, prompts, n=n, params=kwargs.pop("params", PARAMS), stats=stats, **kwargs)
    return outs, stats, steps, pools[0]


def _completions(outs):
    return [(c.token_ids, c.logprobs, c.finish_reason) for group in outs for c in group.completions]


def _assert_close_runs(padded, pool, eager, eager_pool):
    """Same tokens and finish reasons; log-probs within LOGP_ATOL, KV pages within KV_ATOL."""
    got, want = _completions(padded), _completions(eager)
    assert [(t, f) for t, _, f in got] == [(t, f) for t, _, f in want]
    for (_, a, _), (_, b, _) in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=LOGP_ATOL)
    for a, b in zip([*pool[0], *pool[1]], [*eager_pool[0], *eager_pool[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=KV_ATOL)


def test_graph_buckets():
    assert cg.graph_buckets(1) == (1,)
    assert cg.graph_buckets(5) == (1, 2, 4, 5)
    assert cg.graph_buckets(8) == (1, 2, 4, 8)
    assert cg.graph_buckets(10_000)[-3:] == (128, 256, cg.MAX_GRAPH_BATCH)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        cg.graph_buckets(0)


class _Runner:  # what DecodeGraphs reads of a ModelRunner (weakly referenced: SimpleNamespace cannot be)
    device = torch.device("cpu")


def test_bucket_choice():
    runner = _Runner()
    graphs = cg.DecodeGraphs(runner, max_batch=6, max_pages=3)
    assert graphs.buckets == (1, 2, 4, 6) and not graphs.capture

    def step(b, w):
        return Context(is_prefill=False, input_ids=torch.zeros(b, dtype=torch.long), positions=None,
                       slot_mapping=None, page_table=torch.zeros(b, w, dtype=torch.int32))

    assert [graphs.bucket(step(b, 2)) for b in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert graphs.bucket(step(7, 2)) is None  # over the largest bucket: eager
    assert graphs.bucket(step(3, 4)) is None  # a page table wider than the buffers: eager
    graphs.capture, graphs.graphs = True, {4: None}  # capturing: only buckets `prepare` captured are replayed
    assert [graphs.bucket(step(b, 2)) for b in range(1, 7)] == [None, None, 4, 4, None, None]
    with pytest.raises(ValueError, match="max_pages must be >= 1"):
        cg.DecodeGraphs(runner, max_batch=6, max_pages=0)


def test_switch():
    """Graphs only on CUDA with the Triton backend and the switch on (the function reads no device)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with backend.use_backend("triton"):
        assert cg.use_decode_graphs(cuda, True) and not cg.use_decode_graphs(cuda, False)
    with backend.use_backend("reference"):  # its torch references sync: never captured
        assert not cg.use_decode_graphs(cuda, True)
    assert not cg.use_decode_graphs(cpu, True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("impl", ["cpu-kernels", "reference"])
def test_padded_buckets_give_the_eager_tokens(family, impl, model_pair, make_prompts, monkeypatch):
    """Through the padded bucket buffers: the eager path's tokens, its log-probs and KV pages up to rounding. On the
    fp32 C++ kernels and on the torch references (backend "reference")."""
    _, model = model_pair(family)
    prompts = make_prompts(PROMPT_LENS)
    with backend.use_backend("reference" if impl == "reference" else None):
        eager, eager_stats, _, eager_pool = _run(model, prompts, monkeypatch, forced=False)
        padded, stats, steps, pool = _run(model, prompts, monkeypatch, forced=True)
    assert eager_stats["graph_steps"] == 0
    assert stats["graph_steps"] == stats["decode_steps"] == len(steps) > 0  # every decode step took a bucket
    assert any(b < bucket for b, bucket in steps)  # padding rows were exercised
    _assert_close_runs(padded, pool, eager, eager_pool)  # padding rows wrote no page


def test_a_padding_row_that_writes_a_page_is_caught(model_pair, make_prompts, monkeypatch):
    """The check above can fail: padding rows stored at slot 0 (a live page) change the pool and the log-probs."""
    _, model = model_pair("qwen2")
    prompts = make_prompts(PROMPT_LENS)
    eager, _, _, eager_pool = _run(model, prompts, monkeypatch, forced=False)
    monkeypatch.setattr(cg, "PAD_SLOT", 0)
    padded, _, steps, pool = _run(model, prompts, monkeypatch, forced=True)
    assert any(b < bucket for b, bucket in steps)
    assert max((a - b).abs().max() for a, b in zip(pool[0], eager_pool[0])) > 100 * KV_ATOL
    with pytest.raises(AssertionError):
        _assert_close_runs(padded, pool, eager, eager_pool)


def test_batches_over_the_largest_bucket_run_eagerly(model_pair, make_prompts, monkeypatch):
    _, model = model_pair("llama")
    prompts = make_prompts(PROMPT_LENS)
    # 5 rows whose lengths differ: 5 decode rows at first (eager), then 4, 3, 2 (buckets 4, 4, 2)
    params = [SamplingParams(temperature=0.9, max_new_tokens=m, seed=i, stop_token_ids=[])
              for i, m in enumerate([3, 5, 7, 12, 12])]
    monkeypatch.setattr(cg, "MAX_GRAPH_BATCH", 4)
    eager, _, _, eager_pool = _run(model, prompts, monkeypatch, forced=False, n=1, params=params, num_pages=64)
    batches, run = [], ModelRunner.run

    def spy_run(self, ctx):
        if not ctx.is_prefill:
            batches.append(ctx.input_ids.shape[0])
        return run(self, ctx)

    monkeypatch.setattr(ModelRunner, "run", spy_run)
    mixed, stats, steps, pool = _run(model, prompts, monkeypatch, forced=True, n=1, params=params, num_pages=64)
    assert max(batches) == 5 and stats["decode_steps"] == len(batches)
    assert stats["graph_steps"] == sum(b <= 4 for b in batches) > 0  # the steps of 5 rows ran eagerly
    assert max(bucket for _, bucket in steps) == 4
    _assert_close_runs(mixed, pool, eager, eager_pool)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_full_buckets_are_bitwise_eager(temperature, model_pair, make_prompts, monkeypatch):
    """Every step fills its bucket (8 rows, none finishes early): identical shapes, so the tokens, log-probs and KV
    pages are bitwise the eager path's. Covers the copies into the static buffers: page tables that widen as the
    contexts grow (page size 4), copy-on-write of the shared prompt pages (n = 4), greedy and sampled rows."""
    _, model = model_pair("qwen3")
    prompts = make_prompts([6, 11])
    params = SamplingParams(temperature=temperature, max_new_tokens=10, seed=1, stop_token_ids=[])
    eager, _, _, eager_pool = _run(model, prompts, monkeypatch, forced=False, n=4, params=params, page_size=4)
    padded, stats, steps, pool = _run(model, prompts, monkeypatch, forced=True, n=4, params=params, page_size=4)
    assert stats["graph_steps"] == stats["decode_steps"] > 0 and all(b == bucket == 8 for b, bucket in steps)
    assert _completions(padded) == _completions(eager)
    for a, b in zip([*pool[0], *pool[1]], [*eager_pool[0], *eager_pool[1]], strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def traced_bucket_steps(monkeypatch):
    """The host-read tracer of tests/engine/test_host_syncs.py around every decode step's ModelRunner.run, with the
    bucket path forced and its static buffers counted as step tensors."""
    monkeypatch.setattr(cg, "force_eager_buckets", True)
    tracer, steps = HostReadTracer(), []
    run = ModelRunner.run

    def traced_run(self, ctx):
        if ctx.is_prefill:
            return run(self, ctx)
        steps.append(1)
        g = self.graphs
        tracer.tainted.clear()
        tracer.taint(list(self.model.parameters()), self.cache.k, self.cache.v, self.cos, self.sin,
                     [getattr(ctx, f) for f in ctx.__slots__],
                     [g.input_ids, g.positions, g.slot_mapping, g.context_lens, g.page_table])
        with tracer:
            return run(self, ctx)

    monkeypatch.setattr(ModelRunner, "run", traced_run)
    return tracer, steps


def test_bucket_steps_read_no_step_tensor_on_the_host(traced_bucket_steps, model_pair, make_prompts):
    tracer, steps = traced_bucket_steps
    _, model = model_pair("qwen2")
    stats = {}
    generate(model, None, make_prompts([5, 9, 3]), n=2, params=PARAMS, page_size=4, stats=stats)
    assert len(steps) == stats["graph_steps"] > 0
    assert tracer.reads == []


def test_a_host_read_in_the_bucket_path_is_caught(traced_bucket_steps, model_pair, make_prompts, monkeypatch):
    tracer, steps = traced_bucket_steps
    forward = cg.DecodeGraphs._forward_bucket

    def with_item(self, n):
        int(self.context_lens[:n].max())  # a host read of a static buffer
        return forward(self, n)

    monkeypatch.setattr(cg.DecodeGraphs, "_forward_bucket", with_item)
    _, model = model_pair("qwen2")
    generate(model, None, make_prompts([5, 9]), params=PARAMS, page_size=4)
    assert steps and tracer.reads.count("int") == len(steps)


def test_sampling_sees_only_live_rows(model_pair, make_prompts, monkeypatch):
    """The logits handed to the sampler have the step's B rows, never the bucket's padding rows."""
    monkeypatch.setattr(cg, "force_eager_buckets", True)
    rows, sample = [], sampler_mod._sample

    def spy(table, batch, logits):
        rows.append((len(batch.seq_ids), logits.shape[0]))
        return sample(table, batch, logits)

    monkeypatch.setattr(sampler_mod, "_sample", spy)
    _, model = model_pair("qwen2")
    generate(model, None, make_prompts([4, 8, 3]), n=1, params=PARAMS)
    assert rows and all(b == r for b, r in rows)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: a capture records which bucket function ran and its output tensor;
    a replay recomputes that function from the buffers' current contents into the same tensor, as a graph does."""

    capturing = None

    def __init__(self):
        self.recorded = []  # (DecodeGraphs, bucket, output)

    def replay(self):
        for owner, n, out in self.recorded:
            out.copy_(_ORIGINAL_FORWARD_BUCKET(owner, n))


_ORIGINAL_FORWARD_BUCKET = cg.DecodeGraphs._forward_bucket


@contextlib.contextmanager
def _fake_capture(graph, pool=None):
    _FakeGraph.capturing = graph
    try:
        yield
    finally:
        _FakeGraph.capturing = None


def test_capture_mode_with_a_fake_cuda_graph(model_pair, make_prompts, monkeypatch):
    """The CUDA-only control flow on CPU, torch.cuda's graph API replaced by fakes: `prepare` captures each bucket
    once, warm-up and capture see padding rows only, `run` replays only captured buckets, and the replayed output
    buffer (overwritten by every replay) gives the eager path's tokens."""
    prompts = make_prompts(PROMPT_LENS)
    _, model = model_pair("qwen2")
    # Batches 5, 4, 3, 2 (buckets 5, 4, 4, 2): each smaller bucket is captured after a larger step left live rows.
    params = [SamplingParams(temperature=0.9, max_new_tokens=m, seed=i, stop_token_ids=[])
              for i, m in enumerate([3, 5, 7, 12, 12])]
    kwargs = dict(n=1, num_pages=64, params=params)
    eager, _, _, eager_pool = _run(model, prompts, monkeypatch, forced=False, **kwargs)
    captures, padding_only, in_prepare, init, prepare = [], [], [], cg.DecodeGraphs.__init__, cg.DecodeGraphs.prepare

    def capturing_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.capture, self.pool = True, "pool"

    def spy_prepare(self, batch):
        in_prepare.append(1)
        try:
            prepare(self, batch)
        finally:
            in_prepare.pop()

    def recording_forward(self, n):
        if in_prepare:  # warm-up or capture
            padding_only.append(bool((self.slot_mapping[:n] == cg.PAD_SLOT).all()))
        out = _ORIGINAL_FORWARD_BUCKET(self, n)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.recorded.append((self, n, out))
            captures.append(n)
        return out

    for name, fake in (("device", lambda d: contextlib.nullcontext()), ("stream", lambda s: contextlib.nullcontext()),
                       ("Stream", _FakeStream), ("current_stream", _FakeStream), ("CUDAGraph", _FakeGraph),
                       ("graph", _fake_capture)):
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(cg.DecodeGraphs, "__init__", capturing_init)
    monkeypatch.setattr(cg.DecodeGraphs, "prepare", spy_prepare)
    monkeypatch.setattr(cg.DecodeGraphs, "_forward_bucket", recording_forward)
    replayed, stats, steps, pool = _run(model, prompts, monkeypatch, forced=True, **kwargs)
    assert sorted(captures) == sorted(set(captures)) and set(captures) == {n for _, n in steps} == {2, 4, 5}
    assert padding_only and all(padding_only) and len(padding_only) == 2 * len(captures)  # warm-up + capture each
    assert stats["graph_steps"] == stats["decode_steps"] == len(steps)
    _assert_close_runs(replayed, pool, eager, eager_pool)


def test_the_call_frees_its_runner_without_the_garbage_collector(model_pair, make_prompts, monkeypatch):
    """No reference cycle through the bucket buffers: the runner (which holds the KV pool and, on CUDA, the graphs
    and their memory pool) is freed when generate returns, by reference counting alone."""
    monkeypatch.setattr(cg, "force_eager_buckets", True)
    runners, init = [], ModelRunner.__init__

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        runners.append(weakref.ref(self))

    monkeypatch.setattr(ModelRunner, "__init__", spy_init)
    _, model = model_pair("qwen2")
    gc.disable()
    try:
        stats = {}
        generate(model, None, make_prompts([5, 9]), params=PARAMS, stats=stats)
        assert stats["graph_steps"] > 0 and len(runners) == 1 and runners[0]() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_bucket_path_under_the_triton_interpreter():
    """interp_bucket_cases.py in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""
    pytest.importorskip("triton")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", DASH_KERNELS_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(here / "interp_bucket_cases.py")], cwd=here.parent.parent, env=env,
                          capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT_S, check=False)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, tail
