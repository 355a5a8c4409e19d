"""dash.model_io: loading edge cases, one clear error per bad input, atomic save, tokenizers.

Run: .venv/bin/python -m pytest tests/model -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dash.model import ModelConfig
from dash.model_io import _check_vocab, load_model, load_tokenizer, read_config, save_model


def _copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy an HF checkpoint folder, optionally editing its tensors dict / config dict in place."""
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- loading variants that must work


def test_sharded_checkpoint_loads_like_single(hf_checkpoint, tmp_path):
    hf, folder = hf_checkpoint("llama")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert _same_params(load_model(tmp_path), load_model(folder))


def test_tied_checkpoint_with_lm_head_and_old_inv_freq(hf_checkpoint, tmp_path):
    """A tied checkpoint may still carry lm_head.weight, old Llama ones rotary inv_freq buffers: both ignored."""
    _, folder = hf_checkpoint("qwen2_tied")

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    model = load_model(_copy(folder, tmp_path / "c", edit_tensors=add))
    assert _same_params(model, load_model(folder))


def test_dtype_and_legacy_rope_config(hf_checkpoint, tmp_path):
    """bf16 load; and transformers 4.x style rope_theta + rope_scaling parse like 5.x rope_parameters."""
    _, folder = hf_checkpoint("llama3_rope")

    def legacy(c):
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}  # 4.x also used "type"

    model = load_model(_copy(folder, tmp_path / "c", edit_config=legacy), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config == read_config(folder)
    assert model.config.rope_scaling["rope_type"] == "llama3"


# ---------------------------------------------------------------- bad input: one clear error each


def _break_config(key, value=None):
    def edit(c):
        if value is None:
            c.pop(key, None)
        else:
            c[key] = value

    return edit


@pytest.mark.parametrize(
    "edit, exc, pattern",
    [
        (_break_config("model_type"), ValueError, r"config\.json: missing field 'model_type'"),
        (_break_config("model_type", "gpt2"), ValueError, r"config\.json: model_type='gpt2' is not supported"),
        (_break_config("hidden_size"), ValueError, r"config\.json: missing field\(s\) \['hidden_size'\]"),
        (_break_config("num_key_value_heads", 3), ValueError, r"config\.json: .*num_key_value_heads=3"),
        (_break_config("hidden_act", "gelu"), ValueError, r"config\.json: hidden_act='gelu' is not supported"),
        (_break_config("rope_parameters", {"rope_type": "yarn", "factor": 2.0}), ValueError,
         r"config\.json: rope_scaling\.rope_type='yarn' is not supported"),
    ],
    ids=["no_model_type", "bad_model_type", "no_hidden_size", "bad_kv_heads", "bad_act", "bad_rope"],
)
def test_bad_config(hf_checkpoint, tmp_path, edit, exc, pattern):
    _, folder = hf_checkpoint("llama")
    with pytest.raises(exc, match=pattern):
        load_model(_copy(folder, tmp_path / "c", edit_config=edit))


def test_missing_folder_config_and_weights(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: model folder not found"):
        load_model(tmp_path / "nope")
    _, folder = hf_checkpoint("llama")
    bad = _copy(folder, tmp_path / "no_config")
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_model(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(bad)
    bad = _copy(folder, tmp_path / "no_weights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: no model\.safetensors"):
        load_model(bad)


def test_missing_shard(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("llama")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}: shard listed in model\.safetensors\.index\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "spec, edit, pattern",
    [
        ("llama", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         r"model\.safetensors: missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
        ("qwen2_untied", lambda t: t.pop("lm_head.weight"),
         r"missing tensor\(s\) \['lm_head\.weight'\].*tie_word_embeddings=False"),
        ("llama", lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)}),
         r"model\.safetensors: unexpected tensor\(s\) \['model\.layers\.2\.mlp\.up_proj\.weight'\]"),
        ("qwen3", lambda t: t.update({"model.layers.0.self_attn.k_norm.weight": torch.ones(16)}),
         r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_norm\.weight' has shape \[16\] but "
         r".*config\.json implies \[32\]"),
        ("llama", lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
         r"tensor 'model\.norm\.weight' has dtype I32"),
    ],
    ids=["missing", "missing_untied_head", "extra", "shape", "dtype"],
)
def test_bad_tensors(hf_checkpoint, tmp_path, spec, edit, pattern):
    _, folder = hf_checkpoint(spec)
    with pytest.raises(ValueError, match=pattern):
        load_model(_copy(folder, tmp_path / "c", edit_tensors=edit))


# ---------------------------------------------------------------- save: atomic, no silent overwrite


class _FailingTokenizer:
    def save_pretrained(self, folder: str) -> None:
        raise RuntimeError("disk full")


def test_save_is_atomic_and_refuses_overwrite(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("qwen2_tied")
    model = load_model(folder)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, target, tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder is left behind
    save_model(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="out: exists and is not empty"):
        save_model(model, target)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    save_model(model, target, overwrite=True)
    assert _same_params(load_model(target), model)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- tokenizers


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *"0123456789", "+", "*", "="])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_tokenizer_round_trip_keeps_custom_vocab(hf_checkpoint, tmp_path):
    """Saved next to a qwen2 config.json, the custom tokenizer.json must come back as is (not a rebuilt Qwen2 one)."""
    _, folder = hf_checkpoint("qwen2_tied")
    tokenizer = _tiny_tokenizer()
    out = save_model(load_model(folder), tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = load_tokenizer(out)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded("12+3=")["input_ids"] == [4, 5, 13, 6, 15]
    assert loaded.eos_token == "<eos>" and loaded.pad_token_id == 0


def test_tokenizer_errors(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("llama")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: no tokenizer\.json"):
        load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_tokenizer(tmp_path / "nope")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 2, "content": "<s>"}]}))
    _check_vocab({"a": 0, "b": 1, "<s>": 2}, path)
    with pytest.raises(ValueError, match=r"tokenizer\.json: loaded tokenizer vocab differs"):
        _check_vocab({"a": 0, "b": 1}, path)


def test_config_to_hf_dict_round_trip():
    config = ModelConfig(model_type="qwen3", vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, head_dim=12, eos_token_id=[1, 2],
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0})
    assert ModelConfig.from_hf_dict(config.to_hf_dict(torch.bfloat16)) == config
