"""Model and tokenizer: a NaN / inf weight, a tokenizer whose ids do not fit the embedding, a tokenizer file the
tokenizers library cannot read, and a prompt it cannot encode are each one error naming the tensor, sizes, file or
characters, at load (before any step), not a crash inside the tokenizers library at step 15."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dash.model_io import load_model, load_tokenizer
from dash.runtime import ASSETS_DIR
from dash.tokenizer import encode_problem

SHIPPED = ASSETS_DIR / "tiny-sft"  # 16-token char tokenizer, embedding of 16 rows
F32_MAX = torch.finfo(torch.float32).max


def _copy(tmp_path: Path, tensors=None, config=None, tokenizer=None, tokenizer_config=None) -> Path:
    """The shipped model folder, with edits: each argument is a function changing that file's dict in place."""
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    if tensors:
        t = load_file(folder / "model.safetensors")
        tensors(t)
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    for name, edit in (("config.json", config), ("tokenizer.json", tokenizer),
                       ("tokenizer_config.json", tokenizer_config)):
        if edit:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def _set(name: str, value: float, index=(0,)):
    def edit(t):
        t[name][index] = value
    return edit


@pytest.mark.parametrize("edit,dtype,match", [
    (_set("model.embed_tokens.weight", float("nan"), (3, 5)), torch.float32,
     r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has 1 of 2048 values NaN or inf in the file"),
    (_set("model.norm.weight", float("inf")), torch.float32, r"tensor 'model\.norm\.weight' has 1 of 128 values"),
    (_set("model.layers.3.mlp.down_proj.weight", -float("inf")), torch.bfloat16,
     r"tensor 'model\.layers\.3\.mlp\.down_proj\.weight' .* in the file"),
    (_set("model.layers.1.self_attn.q_proj.bias", F32_MAX), torch.bfloat16,
     r"tensor 'model\.layers\.1\.self_attn\.q_proj\.bias' .* after conversion to torch\.bfloat16"),
    (_set("model.layers.0.mlp.up_proj.weight", 1e5), torch.float16,
     r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' .* after conversion to torch\.float16"),
], ids=["nan_embedding", "inf_norm", "neg_inf_bf16", "overflows_bf16", "overflows_fp16"])
def test_non_finite_weight_is_named_at_load(tmp_path, edit, dtype, match):
    folder = _copy(tmp_path, tensors=edit)
    with pytest.raises(ValueError, match=match):
        load_model(folder, dtype=dtype)


def _add_token(data, content="<think>", token_id=16):
    data["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})


@pytest.mark.parametrize("edits,match", [
    ({"tokenizer": _add_token},
     r"the tokenizer has 17 tokens \(largest id 16, '<think>'\) but the model's embedding has vocab_size=16"),
    ({"tokenizer": lambda d: d["model"]["vocab"].update({"=": 40})}, r"largest id 40, '='\) .*vocab_size=16"),
    ({"config": lambda c: c.update(vocab_size=12)}, r"16 tokens \(largest id 15, '='\) .*vocab_size=12"),
    ({"tokenizer": lambda d: _add_token(d, "<pad2>", 16), "tokenizer_config": lambda c: c.update(pad_token="<pad2>")},
     r"largest id 16, '<pad2>'\) .*vocab_size=16"),
], ids=["added_token", "id_past_embedding", "smaller_embedding", "special_token_past_embedding"])
def test_tokenizer_ids_past_the_embedding_are_named_with_both_sizes(tmp_path, edits, match):
    with pytest.raises(ValueError, match=match):
        load_tokenizer(_copy(tmp_path, **edits))


def _unparsable(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.mark.parametrize("name,text,match", [
    ("tokenizer.json", "{not json", r"cannot be read \(JSONDecodeError"),
    ("tokenizer.json", json.dumps({"version": "1.0", "added_tokens": []}), r"cannot be read \(Exception: .*"),
    ("tokenizer.json", (SHIPPED / "tokenizer.json").read_text().replace('"WordLevel"', '"NoSuchModel"'),
     r"cannot be read \(Exception: data did not match any variant"),
    ("tokenizer_config.json", "{bad", r"cannot be read \(JSONDecodeError"),
], ids=["bad_json", "no_model", "unknown_model_type", "bad_tokenizer_config"])
def test_unreadable_tokenizer_file_is_named(tmp_path, name, text, match):
    folder = _copy(tmp_path)
    _unparsable(folder, name, text)
    with pytest.raises(ValueError, match=rf"model: the tokenizer files \['tokenizer\.json', 'tokenizer_config\.json'\] "
                                         rf"{match}"):
        load_tokenizer(folder)


def test_tokenizer_file_that_disagrees_with_its_config_is_named(tmp_path):
    folder = _copy(tmp_path, tokenizer_config=lambda c: c.update(eos_token="<end>"))  # not in the vocabulary
    with pytest.raises(ValueError, match=r"tokenizer\.json: loaded tokenizer vocab differs"):
        load_tokenizer(folder)


def test_a_tokenizer_smaller_than_the_embedding_is_fine(tmp_path):
    """Qwen pads its embedding past the tokenizer: every id the tokenizer emits is still a row of it."""
    def pad(t):
        t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"], torch.zeros(16, 128)])

    folder = _copy(tmp_path, tensors=pad, config=lambda c: c.update(vocab_size=32))
    assert len(load_tokenizer(folder)) == 16 and load_model(folder).config.vocab_size == 32


# ---------------------------------------------------------------- prompts the tokenizer cannot encode


@pytest.mark.parametrize("text,match", [
    ("hello", r"cannot encode 'hello': characters \['e', 'h', 'l', 'o'\] are not in its vocabulary \(16 tokens\)"),
    ("1 + 2", r"characters \[' '\]"),
    ("1+2\n", r"characters \['\\n'\]"),
    ("é+1", r"characters \['é'\]"),
    ("", r"'' encodes to no tokens"),
])
def test_prompt_outside_the_vocabulary_names_the_characters(text, match):
    assert encode_problem(load_tokenizer(SHIPPED), "12+34*56=") is None
    problem = encode_problem(load_tokenizer(SHIPPED), text)
    assert problem is not None and re.search(match, problem), problem


def test_generate_names_the_request_and_characters():
    from dash.engine import SamplingParams, generate

    model = load_model(SHIPPED)
    with pytest.raises(ValueError, match=r"request 1: the tokenizer cannot encode 'hello': characters \['e', 'h'"):
        generate(model, load_tokenizer(SHIPPED), ["1+2=", "hello"], params=SamplingParams(max_new_tokens=2))
