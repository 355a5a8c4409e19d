"""The sampler end to end on CPU: HF parity, KV eviction, group fork, sampling params, seeds, live weights, bad input.

Run: .venv/bin/python -m pytest tests/engine -q
"""

import pytest
import torch

import dash.engine.runner as runner_mod
from dash.attention import varlen_attention
from dash.engine import SamplingParams, generate
from dash.engine.logits_processing import completion_logprobs
from dash.model import CausalLM, ModelConfig
from dash.tokenizer import build_arith_tokenizer
from dash_kernels import backend

LENGTHS = [5, 17, 1, 33, 16]  # ragged; 16 and 17 straddle a page boundary at page_size 4 and 16
GREEDY = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[])
SAMPLED = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_new_tokens=3, max_new_tokens=12, seed=7)


def hf_greedy(hf, prompt, max_new):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Backend "torch" on this CPU: the C++ kernels, every prefill reading its attention from the pages (paged_prefill);
# "reference": the torch references, prefill by varlen attention over the fresh K/V (the CUDA runner's no-hit path).
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate(family, impl, model_pair, make_prompts):
    hf, model = model_pair(family)
    prompts = make_prompts(LENGTHS)
    with backend.use_backend(impl):
        outs = generate(model, None, prompts, params=GREEDY, page_size=4)
    for prompt, out in zip(prompts, outs):
        assert out[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_new_tokens)
        assert out[0].finish_reason == "length" and len(out[0].logprobs) == GREEDY.max_new_tokens


@pytest.mark.parametrize("lengths,varlen", [([70, 70], True), ([70, 20], False)])  # see cpu_prefill_prefers_pages
def test_cpu_prefill_path_follows_run_lengths_and_matches_hf(lengths, varlen, model_pair, make_prompts, monkeypatch):
    """On fp32 CPU a no-hit prefill of long equal runs takes varlen SDPA, of ragged ones the paged kernel; both equal
    HF greedy."""
    hf, model = model_pair("llama")
    calls = []
    monkeypatch.setattr(runner_mod, "varlen_attention", lambda *a, **k: calls.append(1) or varlen_attention(*a, **k))
    prompts = make_prompts(lengths)
    params = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[])
    outs = generate(model, None, prompts, params=params, page_size=4, prefix_caching=False)
    assert bool(calls) is varlen
    for prompt, out in zip(prompts, outs):
        assert out[0].token_ids == hf_greedy(hf, prompt, params.max_new_tokens)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_tiny_pool_evicts_and_still_matches(impl, model_pair, make_prompts):
    hf, model = model_pair("qwen2")
    prompts = make_prompts(LENGTHS)
    stats = {}
    # 14 pages of 4 tokens hold the longest sequence (33 + 20 tokens) and little else.
    with backend.use_backend(impl):
        outs = generate(model, None, prompts, n=2, params=GREEDY, page_size=4, num_pages=14, stats=stats)
    assert stats["evictions"] > 0 and stats["peak_pages"] <= 14
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf, prompt, GREEDY.max_new_tokens)
        assert [o.token_ids for o in out] == [ref, ref]


def test_group_fork_same_tokens_fewer_pages(model_pair, make_prompts):
    _, model = model_pair("llama")
    prompts = make_prompts([9, 16, 23], seed=1)
    G, page = 4, 4
    forked, copies = {}, {}
    a = generate(model, None, prompts, n=G, params=SAMPLED, page_size=page, stats=forked)
    b = generate(model, None, prompts, n=G, params=SAMPLED, page_size=page, group_fork=False, prefix_caching=False,
                 stats=copies)
    assert [[o.token_ids for o in g] for g in a] == [[o.token_ids for o in g] for g in b]
    assert forked["prefill_steps"] == 1 and forked["prompt_tokens"] == copies["prompt_tokens"]
    # Pages right after the prefill (max_new_tokens=1 finishes every sequence in that step): 1x the prompt, not Gx.
    one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
    prompt_pages = sum(-(-len(p) // page) for p in prompts)
    generate(model, None, prompts, n=G, params=one, page_size=page, num_pages=200, stats=forked)
    generate(model, None, prompts, n=G, params=one, page_size=page, num_pages=200, group_fork=False,
             prefix_caching=False, stats=copies)
    assert forked["prefill_steps"] == copies["prefill_steps"] == 1
    assert forked["peak_pages"] == prompt_pages and copies["peak_pages"] == G * prompt_pages


def test_prefix_cache_shares_full_pages_within_a_step(model_pair, make_prompts):
    """G unforked copies in one prefill step: the first computes the prompt, the others reuse its full pages (all but
    the page of the last token, which every copy computes) while reading them in the same forward."""
    _, model = model_pair("llama")
    prompts = make_prompts([9, 16, 23], seed=1)
    G, page = 4, 4
    ref = generate(model, None, prompts, n=G, params=SAMPLED, page_size=page, group_fork=False, prefix_caching=False)
    stats = {}
    out = generate(model, None, prompts, n=G, params=SAMPLED, page_size=page, group_fork=False, stats=stats)
    assert [[o.token_ids for o in g] for g in out] == [[o.token_ids for o in g] for g in ref]
    for g_out, g_ref in zip(out, ref):
        for o, r in zip(g_out, g_ref):
            torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), rtol=0, atol=1e-5)
    reused = [(n - 1) // page for n in (9, 16, 23)]  # full pages before each prompt's last token
    assert stats["prefill_steps"] == 1 and stats["cached_prompt_tokens"] == (G - 1) * page * sum(reused)
    one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
    generate(model, None, prompts, n=G, params=one, page_size=page, num_pages=200, group_fork=False, stats=stats)
    prompt_pages = sum(-(-n // page) for n in (9, 16, 23))
    assert stats["peak_pages"] == G * prompt_pages - (G - 1) * sum(reused)


def test_prefix_cache_reuses_a_shared_system_prompt_across_steps(model_pair, make_prompts):
    """Prompts sharing a 2-page prefix, admitted over several prefill steps (max_batched_tokens) and a pool small
    enough to evict: tokens equal the uncached run and HF greedy, and later steps reuse (or revive) the prefix."""
    hf, model = model_pair("qwen2")
    system = make_prompts([8], seed=11)[0]
    prompts = [system + tail for tail in make_prompts([3, 6, 1, 9, 4, 7], seed=12)]
    stats = {}
    outs = generate(model, None, prompts, params=GREEDY, page_size=4, max_batched_tokens=24, num_pages=16,
                    stats=stats)
    assert stats["prefill_steps"] > 2 and stats["evictions"] > 0 and stats["cached_prompt_tokens"] > 0
    for prompt, out in zip(prompts, outs):
        assert out[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize("sampled", [SAMPLED, SamplingParams(temperature=0.8, min_new_tokens=3, max_new_tokens=12,
                                                                 seed=7)], ids=["filtered", "fused-sampling-op"])
def test_seeded_results_do_not_depend_on_the_batch(sampled, model_pair, make_prompts):
    _, model = model_pair("qwen3")
    target = make_prompts([11], seed=3)[0]
    others = make_prompts([4 + i % 29 for i in range(127)], seed=4)  # with the target: 128 prompts x 2 = 256 rows
    alone = generate(model, None, [target], n=2, params=sampled)[0]
    params = [sampled] + [SamplingParams(temperature=1.0, max_new_tokens=12)] * len(others)
    crowd = generate(model, None, [target] + others, n=2, params=params, page_size=8)[0]
    assert [o.token_ids for o in alone] == [o.token_ids for o in crowd]
    assert alone[0].token_ids != alone[1].token_ids  # the two samples use different streams
    for a, c in zip(alone, crowd):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(20, 0.85), (0, 1.0)], ids=["filtered", "fused-sampling-op"])
def test_logprobs_match_training_forward_recomputation(top_k, top_p, model_pair, make_prompts):
    """With top-k / top-p the step samples through the torch path; without, through dash_kernels.sample_rows (the
    min-tokens stop mask included)."""
    _, model = model_pair("qwen2")
    prompts = make_prompts(LENGTHS, seed=5)
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_new_tokens=4, max_new_tokens=10, seed=1,
                            stop_token_ids=[2, 5, 9])
    outs = generate(model, None, prompts, n=3, params=params, page_size=4)
    flat = [o for group in outs for o in group]
    recomputed = completion_logprobs(model, [prompts[o.prompt_index] for o in flat], [o.token_ids for o in flat],
                                     [params] * len(flat))
    for o, ref in zip(flat, recomputed):
        assert torch.isfinite(torch.tensor(o.logprobs)).all()
        assert (torch.tensor(o.logprobs) - ref).abs().max() <= 1e-4


def test_logprobs_match_dash_kernels_token_logprobs(model_pair, make_prompts):
    """Temperature-only sampling: the recomputation goes through the trainer's fused kernel (no [T, V] logits)."""
    _, model = model_pair("qwen3")
    prompts = make_prompts([3, 12, 20], seed=9)
    params = SamplingParams(temperature=0.9, max_new_tokens=10, seed=2, stop_token_ids=[])
    outs = generate(model, None, prompts, n=2, params=params, page_size=8)
    flat = [o for group in outs for o in group]
    recomputed = completion_logprobs(model, [prompts[o.prompt_index] for o in flat], [o.token_ids for o in flat],
                                     [params] * len(flat))
    for o, ref in zip(flat, recomputed):
        assert (torch.tensor(o.logprobs) - ref).abs().max() <= 1e-4


def test_stop_tokens_min_and_max_new_tokens(model_pair, make_prompts):
    _, model = model_pair("llama")
    prompts = make_prompts([6] * 8, seed=6)
    stop = list(range(3, 60))  # most of the vocabulary: sequences stop almost at once unless min_new holds them
    outs = generate(model, None, prompts, n=2, params=SamplingParams(temperature=1.0, max_new_tokens=9,
                                                                     min_new_tokens=3, stop_token_ids=stop, seed=0))
    reasons = set()
    for o in (o for g in outs for o in g):
        reasons.add(o.finish_reason)
        assert 3 <= len(o.token_ids) <= 9 and not set(o.token_ids[:2]) & set(stop)
        assert (o.finish_reason == "stop") == (o.token_ids[-1] in stop)
    assert reasons == {"stop", "length"} or reasons == {"stop"}
    top1 = generate(model, None, prompts, params=SamplingParams(temperature=1.3, top_k=1, max_new_tokens=5,
                                                                stop_token_ids=[]))
    greedy = generate(model, None, prompts, params=SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=[]))
    assert [g[0].token_ids for g in top1] == [g[0].token_ids for g in greedy]
    assert all(lp == 0.0 for g in top1 for lp in g[0].logprobs)  # top-k 1 leaves a point mass


def test_context_limit_caps_completion(model_pair):
    _, model = model_pair("qwen2")
    prompt = list(range(3, 3 + 90))  # context 96: room for 6 new tokens
    out = generate(model, None, [prompt], params=SamplingParams(max_new_tokens=50, stop_token_ids=[], seed=0))[0][0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_text_and_stop_strings_with_a_tokenizer():
    tok = build_arith_tokenizer()
    cfg = ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():  # tied N(0, 1) embeddings make the last input token a point mass; flatten the logits
        model.model.embed_tokens.weight.mul_(0.1)
    params = [SamplingParams(max_new_tokens=16, stop=["7"], stop_token_ids=[], seed=s) for s in range(16)]
    outs = generate(model, tok, ["12+34*56="] * 16, params=params)
    hits = 0
    for o in (g[0] for g in outs):
        full = tok.decode(o.token_ids)
        assert o.text == full.split("7")[0] if o.finish_reason == "stop" and "7" in full else o.text == full
        hits += o.finish_reason == "stop" and "7" in full
    assert hits > 0


def test_next_call_sees_updated_weights(model_pair, make_prompts):
    _, model = model_pair("llama")
    prompts = make_prompts([7, 12], seed=8)
    before = generate(model, None, prompts, params=GREEDY)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ids, cu, pos = torch.tensor(prompts[0]), torch.tensor([0, 7], dtype=torch.int32), torch.arange(7)
        model.compute_logits(model.forward_packed(ids, cu, pos)).logsumexp(-1).sum().backward()
        opt.step()
        after = generate(model, None, prompts, params=GREEDY)
        for prompt, out in zip(prompts, after):  # reference: greedy by full recomputation with the new weights
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(GREEDY.max_new_tokens):
                    seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            assert out[0].token_ids == seq[len(prompt):]
        assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    finally:
        model.load_state_dict(snapshot)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[5] * 96]), "request 0: prompt has 96 tokens but the model's context is 96"),
    (dict(prompts=[[5], []]), "request 1: empty prompt"),
    (dict(n=0), "n \\(samples per prompt\\)"),
    (dict(params=SamplingParams(temperature=-1)), "request 0: temperature"),
    (dict(params=SamplingParams(top_p=0)), "request 0: top_p"),
    (dict(params=SamplingParams(top_p=1.5)), "request 0: top_p"),
    (dict(params=SamplingParams(top_k=-1)), "request 0: top_k"),
    (dict(num_pages=2, page_size=4), "num_pages=2 is too small: prompt 0 needs 3 pages"),
    (dict(prompts=[[500]]), "request 0: token ids"),
    (dict(prompts="abc"), "prompts must be"),
    (dict(params=SamplingParams(stop="12")), "request 0: stop must be a list"),  # not the stops "1" and "2"
    (dict(params=SamplingParams(stop=["\n"])), "request 0: stop strings .* need a tokenizer"),
    (dict(params=SamplingParams(stop_token_ids=[10**6], min_new_tokens=2, top_k=5)), "request 0: stop_token_ids"),
    (dict(params=SamplingParams(seed=2**63)), "request 0: seed must be in"),
])
def test_bad_input_is_value_error_before_work(kwargs, match, model_pair, monkeypatch):
    _, model = model_pair("llama")
    from dash.engine import runner

    monkeypatch.setattr(runner.ModelRunner, "run", lambda *a: pytest.fail("work started before validation"))
    args = dict(prompts=[[5, 6, 7]], n=1, params=SamplingParams(max_new_tokens=8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, None, args.pop("prompts"), **args)


def test_default_pool_fits_in_free_device_memory(model_pair, make_prompts, monkeypatch):
    """num_pages=0: every page the call could use, capped on CUDA (free bytes known) at KV_MEMORY_FRACTION of the free
    memory; generate rejects a cap too small for one sequence before any work."""
    import dash.engine.generation as sampler_mod
    from dash.engine.generation import KV_MEMORY_FRACTION, default_num_pages

    assert default_num_pages(300, 4096, None) == 300  # CPU: no cap
    assert default_num_pages(300, 4096, 10 * 4096) == int(10 * KV_MEMORY_FRACTION)
    assert default_num_pages(300, 4096, 10**9) == 300
    assert default_num_pages(300, 4096, 0) == 1
    monkeypatch.setattr(sampler_mod, "default_num_pages", lambda needed, per_page, free: 2)  # as if memory were short
    with pytest.raises(ValueError, match="default pool .* holds 2 pages: prompt 0 needs 7 pages"):
        generate(model_pair("qwen2")[1], None, make_prompts([5]), params=GREEDY, page_size=4)


@pytest.mark.parametrize("budget", ["default", "zero"])
def test_runner_packs_weights_for_the_avx512_gemms_within_its_budget(budget, model_pair, make_prompts, monkeypatch):
    """fp32 CPU with AVX-512: every layer and the lm_head are packed for the call (dash_kernels.linear); with a zero
    budget nothing is, and torch's GEMMs run. Both match HF greedy; the reference backend never packs."""
    from dash_kernels import _C

    hf, model = model_pair("qwen3")
    if budget == "zero":
        monkeypatch.setattr(runner_mod, "PACKED_WEIGHTS_BUDGET_BYTES", 0)
    runners = []
    real_init = runner_mod.ModelRunner.__init__
    monkeypatch.setattr(runner_mod.ModelRunner, "__init__",
                        lambda self, *a, **k: runners.append(self) or real_init(self, *a, **k))
    prompts = make_prompts(LENGTHS)
    outs = generate(model, None, prompts, params=GREEDY, page_size=4)
    packs = budget == "default" and bool(_C.has_avx512())
    assert all((s.packed is not None) == packs for s in runners[0].layers)
    assert (runners[0].packed_head is not None) == packs
    for prompt, out in zip(prompts, outs):
        assert out[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_new_tokens)
    with backend.use_backend("reference"):
        generate(model, None, prompts[:1], params=GREEDY, page_size=4)
    assert runners[-1].packed_head is None and all(s.packed is None for s in runners[-1].layers)


def test_cpu_kv_pool_is_reused_by_the_next_fitting_call(model_pair, make_prompts, monkeypatch):
    """A CPU call hands its K/V pool to the next call whose geometry fits (no fresh pages to fault in); the stale
    K/V it holds change nothing; a call that needs more pages allocates its own; a running call owns its pool."""
    from dash.engine import kv_cache

    hf, model = model_pair("qwen2")
    kv_cache.release_cpu_pool()
    caches = []
    real_init = kv_cache.KVCache.__init__
    monkeypatch.setattr(kv_cache.KVCache, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **k) or caches.append(self._pool[0][0]))
    prompts = make_prompts(LENGTHS)
    first = generate(model, None, prompts, params=GREEDY, page_size=4)
    assert len(kv_cache._CPU_POOLS) == 1
    again = generate(model, None, prompts[:2], params=GREEDY, page_size=4)  # fewer pages: the same pool
    assert caches[1] is caches[0] and len(kv_cache._CPU_POOLS) == 1
    assert [o[0].token_ids for o in again] == [o[0].token_ids for o in first[:2]]
    for prompt, out in zip(prompts[:2], again):
        assert out[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_new_tokens)
    generate(model, None, prompts, n=3, params=GREEDY, page_size=4)  # 3x the pages: a new pool, kept afterwards
    assert caches[2].shape[0] > caches[0].shape[0] and kv_cache._CPU_POOLS[0][0][0] is caches[2]
    generate(model, None, prompts, params=GREEDY, page_size=8)  # another page size: not reused
    assert caches[3].shape[1] == 8 and kv_cache._CPU_POOLS[0][0][0] is caches[3]
    taken = kv_cache.KVCache(model, 4, 8)  # a running call holds the pool: the next one gets another
    assert kv_cache._CPU_POOLS == [] and kv_cache.KVCache(model, 4, 8).k[0].data_ptr() != taken.k[0].data_ptr()
    kv_cache.release_cpu_pool()
    assert kv_cache._CPU_POOLS == []
    with backend.use_backend("reference"):  # torch attention over gathered pages: never a recycled pool
        generate(model, None, prompts[:1], params=GREEDY, page_size=4)
    assert kv_cache._CPU_POOLS == []
