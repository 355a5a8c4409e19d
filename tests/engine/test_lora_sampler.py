"""The in-process sampler with LoRA adapters (dash/lora.py, dash/engine/runner.py): greedy tokens equal HF + peft
`generate` with the same adapter, log-probs equal the training forward's, and the base weights are neither merged nor
changed. On fp32 CPU with AVX-512 the runner packs W + scaling * B A once per call: that path is checked where the
packed GEMMs run (skipped, with the reason, on CPUs without AVX-512)."""

import pytest
import torch

from dash.config import LoRAConfig
from dash.engine import SamplingParams, generate
from dash.engine.logits_processing import completion_logprobs
from dash.lora import apply_lora, layer_adapters, lora_modules, save_adapter
from dash.model_io import load_model
from dash.model_parts import fold_lora
from dash_kernels import backend
from dash_kernels.decoder_layer import LAYER_WEIGHTS, decoder_layer_ref
from dash_kernels.linear import packed_gemm_available
from tests.engine.conftest import build_pair

peft = pytest.importorskip("peft", reason="peft is in the dev extra: pip install -e .[dev]")

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])
_B_STD = 0.1  # moves the logits enough that greedy tokens differ from the base model's


def _lora_pair(family, folder, targets="all-linear"):
    hf, _ = build_pair(family, folder)
    model = load_model(folder)
    apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * _B_STD)
    save_adapter(model, folder / "adapter", base_model_name_or_path=str(folder))
    return hf, model


def _peft_greedy(hf, folder, prompts, max_new):
    pm = peft.PeftModel.from_pretrained(hf, folder / "adapter").eval()
    out = [pm.generate(input_ids=torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    pm.unload()
    return out


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("family,targets", [("qwen2", "all-linear"), ("qwen3", "q_proj,v_proj,down_proj")])
def test_greedy_with_adapters_matches_peft_generate(family, targets, impl, tmp_path, make_prompts):
    hf, model = _lora_pair(family, tmp_path, targets)
    prompts = make_prompts([5, 17, 1, 9])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with backend.use_backend(impl):
        outs = generate(model, None, prompts, params=GREEDY, page_size=4)
    ours = [o[0].token_ids for o in outs]
    assert ours == _peft_greedy(hf, tmp_path, prompts, GREEDY.max_new_tokens)
    with backend.use_backend(impl):
        base = [o[0].token_ids for o in generate(load_model(tmp_path), None, prompts, params=GREEDY, page_size=4)]
    assert ours != base, "the adapters must change some greedy token, or this test shows nothing"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing merged into the model


def test_sampled_logprobs_match_training_forward_with_adapters(tmp_path, make_prompts):
    _, model = _lora_pair("llama", tmp_path)
    prompts = make_prompts([4, 11, 20], seed=3)
    params = SamplingParams(temperature=0.8, max_new_tokens=8, seed=1, stop_token_ids=[])
    flat = [o for group in generate(model, None, prompts, n=2, params=params, page_size=4) for o in group]
    ref = completion_logprobs(model, [prompts[o.prompt_index] for o in flat], [o.token_ids for o in flat],
                              [params] * len(flat))
    for o, r in zip(flat, ref):
        assert (torch.tensor(o.logprobs) - r).abs().max() <= 1e-4


def test_merged_fold_equals_adapter_beside_weight(tmp_path):
    """The packed path's fold (W + scaling * B A per projection) computes the same layer as the unmerged chain."""
    _, model = _lora_pair("qwen2", tmp_path)
    layer = model.model.layers[1]
    w, ad = layer.weight_slots(), layer_adapters(layer)
    assert sum(a is not None for a in ad) == 7 and ad[LAYER_WEIGHTS.index("q")][2] == 2.0
    merged = fold_lora(w, ad)
    assert all(m is t for m, t, a in zip(merged, w, ad) if a is None)  # norms / biases: the tensors themselves
    T, D = 6, model.config.head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, model.config.hidden_size, generator=g)
    cos, sin = model.model.rotary_emb(torch.arange(T))

    def attend(q, k, v):  # plain causal attention: the layer's maths, not the cache's
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        vv = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1),
                                                                vv.transpose(0, 1), is_causal=True).transpose(0, 1)

    a, b = x.clone(), x.clone()
    with torch.no_grad():
        decoder_layer_ref(a, w, model.config.rms_norm_eps, cos, sin, attend, ad)
        decoder_layer_ref(b, merged, model.config.rms_norm_eps, cos, sin, attend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, x)


@pytest.mark.skipif(not packed_gemm_available(torch.zeros(1)), reason="packed GEMMs need fp32 CPU with AVX-512")
def test_packed_path_with_adapters_matches_peft(tmp_path, make_prompts):
    import dash.model_parts as model_mod

    hf, model = _lora_pair("llama", tmp_path)
    prompts = make_prompts([5, 17, 9])
    packed_calls = []
    real = model_mod.pack_layer
    model_mod.pack_layer = lambda ws: packed_calls.append(1) or real(ws)
    try:
        outs = generate(model, None, prompts, params=GREEDY, page_size=4)
    finally:
        model_mod.pack_layer = real
    assert packed_calls, "the packed path did not run"
    assert [o[0].token_ids for o in outs] == _peft_greedy(hf, tmp_path, prompts, GREEDY.max_new_tokens)
