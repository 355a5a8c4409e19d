"""LoRA (dash/lora.py): the wrapping, peft parity in both directions, and the bad inputs of issue 21.

peft is the reference: our adapter saved and loaded by `peft.PeftModel.from_pretrained` onto the HF model gives our
logits, and an adapter peft saved loads into our model with the same result. B is drawn non-zero in both (a fresh
adapter has B = 0 and would match whatever A did)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dash.config import ConfigError, LoRAConfig, load_config
from dash.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_modules,
    save_adapter,
)
from dash.model_io import load_model

peft = pytest.importorskip("peft", reason="peft is in the dev extra: pip install -e .[dev]")

_B_STD = 0.05  # large enough that the adapter moves the logits by O(0.1), small enough for fp32 agreement


def _perturb(model, seed=1):
    """Non-zero B (and fresh A) so the adapter's output matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * _B_STD)


def _ids(vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 9), generator=g)


def test_config_bad_input():
    with pytest.raises(ConfigError, match=r"model.lora.rank must be >= 1, got 0"):
        load_config(None, ["--model.lora.rank=0"])
    with pytest.raises(ConfigError, match=r"model.lora.rank must be >= 1, got -2"):
        load_config(None, ["--model.lora.rank=-2"])
    with pytest.raises(ConfigError, match=r"target_modules: 'qkv_proj' matches no module \(available: all-linear, "
                                          r"q_proj, k_proj"):
        load_config(None, ["--model.lora.target_modules=q_proj,qkv_proj"])
    with pytest.raises(ConfigError, match=r"model.lora.dropout must be in \[0, 1\)"):
        load_config(None, ["--model.lora.dropout=1.0"])
    cfg = load_config(None, ["--model.lora.target_modules=[q_proj, v_proj]"])
    assert not cfg.model.lora.enabled and cfg.model.lora.target_names() == ["q_proj", "v_proj"]


def test_wrap_freezes_base_and_shares_weights(hf_checkpoint):
    _, folder = hf_checkpoint("qwen2_untied")
    model = load_model(folder)
    q = model.model.layers[0].self_attn.q_proj
    weight, bias = q.weight, q.bias
    names = apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, target_modules="q_proj,down_proj"))
    assert names == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj"))
    wrapped = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, LoRALinear) and wrapped.weight is weight and wrapped.bias is bias  # no copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert wrapped.lora_A.weight.shape == (4, 64) and wrapped.lora_B.weight.shape == (4 * 16, 4)
    assert wrapped.scaling == 2.0


def test_fresh_adapter_is_identity_and_disable(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    base, model = load_model(folder), load_model(folder)
    apply_lora(model, LoRAConfig(enabled=True, rank=4))
    ids = _ids()
    assert torch.equal(model(ids), base(ids))  # B = 0
    _perturb(model)
    assert not torch.allclose(model(ids), base(ids), atol=1e-3)
    with adapters_disabled(model):
        assert torch.equal(model(ids), base(ids))


def test_target_matching_no_module_names_available(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    model = load_model(folder)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.nope matches no module of the model \(available: "
                                         r"down_proj, gate_proj"):
        apply_lora(model, LoRAConfig(enabled=True), targets=["model.layers.0.mlp.nope"])


@pytest.mark.parametrize("family", ["qwen2_untied", "qwen3"])
def test_peft_loads_our_adapter_same_logits(hf_checkpoint, tmp_path, family):
    hf_model, folder = hf_checkpoint(family)
    model = load_model(folder)
    apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=12, target_modules="q_proj,v_proj,o_proj,up_proj"))
    _perturb(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["bias"] == "none"
    ids = _ids()
    ours = model(ids)
    # a copy: peft freezes the base parameters it wraps, and the session-cached HF model is shared with other tests
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "adapter").eval()
    try:
        theirs = peft_model(input_ids=ids).logits
        loaded = {k for k in peft_model.state_dict() if "lora_A" in k}
        assert len(loaded) == 2 * 4  # 2 layers x 4 targets: every adapter was read, none silently dropped
    finally:
        peft_model.unload()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - load_model(folder)(ids)).abs().max() > 1e-2  # the adapter mattered


def test_we_load_an_adapter_peft_saved(hf_checkpoint, tmp_path):
    hf_model, folder = hf_checkpoint("llama")
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "gate_proj", "down_proj"],
                             task_type="CAUSAL_LM", lora_dropout=0.1)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), config)  # peft freezes what it wraps
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * _B_STD)
        peft_model.save_pretrained(tmp_path / "peft")
        peft_model.eval()
        ids = _ids()
        theirs = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    model = load_model(folder)
    names = load_adapter(model, tmp_path / "peft")
    assert len(names) == 6 and all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    assert next(iter(lora_modules(model).values())).scaling == 5 / 3
    torch.testing.assert_close(model.eval()(ids), theirs, rtol=1e-4, atol=1e-4)


def test_adapter_for_another_base_is_refused(hf_checkpoint, tmp_path):
    _, small = hf_checkpoint("llama")
    _, other = hf_checkpoint("qwen3")  # head_dim 32: q_proj is [128, 64], not [64, 64]
    model = load_model(other)
    apply_lora(model, LoRAConfig(enabled=True, rank=2, target_modules="q_proj"))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: base_model.model.model.layers.0.self_attn."
                                         r"q_proj.lora_B.weight has shape \[128, 2\], the model needs \[64, 2\]"):
        load_adapter(load_model(small), tmp_path / "a")
    # module names that the model lacks: a 3-layer adapter onto a 2-layer model
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "a" / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match=r"module 'model.layers.7.self_attn.q_proj' is not in this model"):
        load_adapter(load_model(other), tmp_path / "a")


def test_unsupported_peft_features_are_named(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("llama")
    model = load_model(folder)
    apply_lora(model, LoRAConfig(enabled=True, rank=2, target_modules="q_proj"))
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is not supported"):
        load_adapter(load_model(folder), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
        load_adapter(load_model(folder), tmp_path)


def test_adapter_state_dict_is_the_parameters(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    model = load_model(folder)
    apply_lora(model, LoRAConfig(enabled=True, rank=2, target_modules="v_proj"))
    sd = adapter_state_dict(model)
    assert sorted(sd) == [f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{x}.weight"
                          for i in range(2) for x in "AB"]
    assert sd["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] is \
        model.model.layers[0].self_attn.v_proj.lora_A.weight
