"""The sampler on a CUDA device against HF `generate`, and the flash-attn paths when flash-attn is installed.

fp32: greedy tokens equal HF's exactly (as on CPU, tests/engine/test_engine.py). bf16: a bf16 model cannot match an
fp32 one token for token (a near tie flips and the sequences part), so the tolerance is per step: teacher-forcing the
fp32 HF model on our bf16 completion, every greedy pick's fp32 logit is within BF16_GREEDY_ULPS bf16 ulps (2^-8
relative) of that step's largest logit, and at least BF16_EXACT_FRACTION of the picks are the fp32 argmax itself.
Measured on CPU for these tiny random models (bf16, 5 prompts x 20 tokens, three families): gaps up to 2 ulps, 96-99%
exact picks.
"""

import pytest
import torch

from dash import attention
from dash.engine import SamplingParams, generate
from dash.engine import runner as runner_module
from tests.engine.conftest import build_pair, random_prompts

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
LENGTHS = [5, 17, 1, 33, 16]  # ragged; 16 and 17 straddle a page boundary at page size 4 and 16
GREEDY = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[])
BF16_GREEDY_ULPS = 8  # 4x the largest gap measured on CPU
BF16_EXACT_FRACTION = 0.9
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """pairs(family) -> (the HF model on CUDA in fp32, our model of the same weights, moved by each test)."""
    cache = {}

    def get(family):
        if family not in cache:
            hf, model = build_pair(family, tmp_path_factory.mktemp(family))
            cache[family] = (hf.to(CUDA), model)
        return cache[family]

    return get


def _hf_greedy(hf, prompt, max_new):
    out = hf.generate(torch.tensor([prompt], device=CUDA), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("page_size", [4, 256])  # 256: the presets' page size, one page per sequence here
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fp32_greedy_equals_hf_generate(family, page_size, pairs):
    hf, model = pairs(family)
    model = model.to(CUDA)
    prompts = random_prompts(LENGTHS)
    outs = generate(model, None, prompts, params=GREEDY, page_size=page_size)
    for prompt, out in zip(prompts, outs):
        assert out[0].token_ids == _hf_greedy(hf, prompt, GREEDY.max_new_tokens)
        assert out[0].finish_reason == "length" and len(out[0].logprobs) == GREEDY.max_new_tokens


def _check_near_fp32_argmax(hf, prompts, outs):
    """Teacher-forces the fp32 HF model on each completion; see the module docstring for the criterion."""
    gaps, worst_allowed = [], []
    for prompt, out in zip(prompts, outs):
        tokens = torch.tensor(out[0].token_ids, device=CUDA)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out[0].token_ids], device=CUDA)).logits[0].double()  # [L, V]
        step = logits[len(prompt) - 1:-1]  # [20, V]: the logits each pick was made from
        top = step.max(-1).values
        gaps.append(top - step.gather(1, tokens[:, None]).squeeze(1))
        worst_allowed.append(BF16_GREEDY_ULPS * BF16_ULP * step.abs().max(-1).values)
    gaps, allowed = torch.cat(gaps), torch.cat(worst_allowed)
    assert (gaps <= allowed).all(), f"picks beyond {BF16_GREEDY_ULPS} bf16 ulps of the fp32 argmax: {gaps.max():.4f}"
    exact = float((gaps == 0).double().mean())
    assert exact >= BF16_EXACT_FRACTION, f"only {exact:.0%} of the bf16 greedy picks are the fp32 argmax"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_greedy_within_tolerance_of_fp32_hf(family, pairs):
    hf, model = pairs(family)
    model = model.to(device=CUDA, dtype=torch.bfloat16)
    try:
        prompts = random_prompts(LENGTHS)
        outs = generate(model, None, prompts, params=GREEDY, page_size=16)
        _check_near_fp32_argmax(hf, prompts, outs)
    finally:
        model.float()  # the module-scoped pair stays fp32 for the other tests


def test_flash_attn_varlen_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install flash-attn)")
    assert attention.HAS_FLASH_ATTN
    g = torch.Generator(device=CUDA).manual_seed(0)
    lengths = [5, 300, 1, 64]
    T, D = sum(lengths), 64
    q = torch.randn(T, 14, D, generator=g, device=CUDA).bfloat16()
    k, v = (torch.randn(T, 2, D, generator=g, device=CUDA).bfloat16() for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    assert attention.select_backend(q) == "flash"
    flash = attention.varlen_attention(q, k, v, cu, max(lengths), D ** -0.5)
    ref = attention.varlen_attention(q.float(), k.float(), v.float(), cu, max(lengths), D ** -0.5)  # fp32: SDPA
    err = (flash.float() - ref).abs().max().item()
    assert err <= 4 * BF16_ULP * ref.abs().max().item(), err  # bf16 inputs and output: a few ulps of the output


def test_flash_attn_decode_in_the_sampler(pairs, monkeypatch):
    """With flash-attn, a bf16 decode at page size 256 reads the pages with flash_attn_with_kvcache."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install flash-attn)")
    hf, model = pairs("qwen2")
    model = model.to(device=CUDA, dtype=torch.bfloat16)
    calls = []
    real = runner_module.flash_attn_with_kvcache

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "flash_attn_with_kvcache", counting)
    try:
        prompts = random_prompts(LENGTHS)
        outs = generate(model, None, prompts, params=GREEDY, page_size=256)
        assert calls, "the flash-attn decode path did not run"
        _check_near_fp32_argmax(hf, prompts, outs)
    finally:
        model.float()
