"""dash.rl.export / `dash export`: the HF folder it writes loads in transformers with our logits (single file and sharded),
an FSDP checkpoint exports exactly as the equivalent replica checkpoint, the tokenizer round-trips, a run with a
damaged newest checkpoint exports the one before, every bad input fails before any weight is read naming the path,
and an interrupted export leaves nothing behind. A LoRA checkpoint exports merged (transformers: the LoRA model's
logits, no lora_ tensor) or as peft's adapter folder (peft loads it onto the base it names, same logits).

Run: .venv/bin/python -m pytest tests/rl/test_export.py -q
"""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import dash.rl.export as export
from dash.cli import main as cli_main
from dash.config import config_to_dict, load_config
from dash.rl.export import ExportError, export_checkpoint
from dash.lora import apply_lora, lora_modules
from dash.model_io import load_model, load_tokenizer, save_model
from dash.rl.checkpoint import save_checkpoint, save_sharded_checkpoint
from dash.rl.fsdp import shard_model
from dash.runtime import resolve_model_path
from dash.rl.warmstart import TINY_MODEL_CONFIG, build_tiny_model
from tests.model.test_parity import LOGIT_ATOL
from tests.rl.test_checkpoint import _fires, _Payload
from tests.rl.test_fsdp import ONE_RANK, one_rank_group  # noqa: F401  (one_rank_group: a fixture used below)

BASE = "builtin:tiny-sft"  # the shipped trained tiny model: its logits are peaked, not the near-uniform ones of an init
PROMPTS = ["12+3*4=", "7+8*9=", "1+2*3=15", "9*9="]
TEXTS = [*PROMPTS, "42<eos>", "<bos>3+4=7<eos><pad>"]
RUN_CFG = config_to_dict(load_config(None, [f"--model.path={BASE}", "--sampling.temperature=0.7",
                                            "--sampling.top_p=0.95", "--sampling.top_k=5"]))
# 4 layers of ~0.78 MB in fp32: a 1 MB limit puts them in several files
SMALL_SHARD = 1_000_000
# a subset of the projections, rank 4, scaling 2: a run config the export must follow, not the defaults
LORA = ["--model.lora.enabled=true", "--model.lora.rank=4", "--model.lora.alpha=8",
        "--model.lora.target_modules=q_proj,v_proj,down_proj"]
LORA_CFG = config_to_dict(load_config(None, [f"--model.path={BASE}", *LORA]))
LORA_B_STD = 0.05  # trained-looking adapters: they move the logits by ~1, far beyond LOGIT_ATOL


def _trained(seed: int):
    """The base model moved by seeded noise, standing for a run's weights: nothing may come from the base folder."""
    model = load_model(resolve_model_path(BASE))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run folder (adapter/ only, base = BASE) as the trainer writes it, and its LoRA model."""
    model = load_model(resolve_model_path(BASE))
    apply_lora(model, load_config(None, LORA).model.lora)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B starts at zero: move it, or the adapters change nothing
            m.lora_B.weight.normal_(0, LORA_B_STD, generator=gen)
    folder = tmp_path_factory.mktemp("lora_run")
    save_checkpoint(folder, 1, model, load_tokenizer(resolve_model_path(BASE)), {"config": LORA_CFG},
                    base_model=str(resolve_model_path(BASE)))
    return folder, model


@pytest.fixture
def tokenizer():
    """A fresh one per test: encoding with padding=True sets padding state that save_pretrained then writes."""
    return load_tokenizer(resolve_model_path(BASE))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with checkpoints step-1 and step-2 (latest), as the trainer writes them; and step-2's model."""
    folder = tmp_path_factory.mktemp("run")
    tokenizer = load_tokenizer(resolve_model_path(BASE))
    save_checkpoint(folder, 1, _trained(1), tokenizer, {"config": RUN_CFG})
    model = _trained(2)
    save_checkpoint(folder, 2, model, tokenizer, {"config": RUN_CFG})
    return folder, model


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask  # [B, L] right-padded


def _hf_logits(folder, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits, mask.bool()  # [B, L, V]


def _weights(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_export_of_a_run_loads_in_transformers_with_our_logits(run, tokenizer, tmp_path):
    folder, model = run
    out = export_checkpoint(folder, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()} and not (out / "model.safetensors.index.json").exists()
    got = _weights(out)  # the latest checkpoint's weights, bit for bit
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    hf, real = _hf_logits(out, tokenizer)
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        ours = model(ids, mask)  # [B, L, V]
    # same fp32 weights on both sides: only the summation order differs, as in tests/model/test_parity.py
    assert (hf[real] - ours[real]).abs().max() <= LOGIT_ATOL
    gen = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.7, 0.95, 5)
    assert "max_new_tokens" not in json.loads((out / "generation_config.json").read_text())


def test_sharded_export_loads_with_the_same_logits(run, tokenizer, tmp_path):
    folder, model = run
    single = export_checkpoint(folder, tmp_path / "single")
    sharded = export_checkpoint(folder, tmp_path / "sharded", max_shard_bytes=SMALL_SHARD)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert all(f.stat().st_size <= SMALL_SHARD for f in sharded.glob("*.safetensors"))
    a, real = _hf_logits(single, tokenizer)
    b, _ = _hf_logits(sharded, tokenizer)
    assert torch.equal(a, b)  # same weights, same HF code
    ours = load_model(sharded).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_fsdp_checkpoint_exports_as_the_replica_checkpoint(one_rank_group, tokenizer, tmp_path):  # noqa: F811
    model = _trained(3)
    sharded = shard_model(copy.deepcopy(model), average_grads=False)
    save_sharded_checkpoint(tmp_path / "fsdp", 1, sharded, torch.optim.AdamW(sharded.parameters()),
                            {"config": RUN_CFG}, ONE_RANK)
    ddp_ckpt = save_checkpoint(tmp_path / "ddp", 1, model, tokenizer, {"config": RUN_CFG})
    a = export_checkpoint(tmp_path / "fsdp", tmp_path / "from_fsdp")  # a run folder: its latest, sharded
    b = export_checkpoint(ddp_ckpt, tmp_path / "from_ddp")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        if f.suffix != ".safetensors":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # without the run's model.path in the checkpoint, the base folder must be named
    bare = save_sharded_checkpoint(tmp_path / "bare", 1, sharded, torch.optim.AdamW(sharded.parameters()), {},
                                   ONE_RANK)
    with pytest.raises(ExportError, match=rf"{bare} is a sharded \(FSDP\) checkpoint.*--base"):
        export_checkpoint(bare, tmp_path / "x")
    c = export_checkpoint(bare, tmp_path / "from_bare", base=resolve_model_path(BASE))
    assert all(torch.equal(v, wb[k]) for k, v in _weights(c).items()) and _weights(c).keys() == wb.keys()
    # a base of another shape is named before any shard is read; a crafted .metadata is refused, never run
    other = save_model(build_tiny_model(config={**TINY_MODEL_CONFIG, "num_hidden_layers": 2}), tmp_path / "other",
                       tokenizer=tokenizer)
    with pytest.raises(ExportError, match=r"tensor 'model\.layers\.2\..*' is \[.*\] in the shards but not a parameter "
                                          rf"for {other / 'config.json'}"):
        export_checkpoint(bare, tmp_path / "x", base=other)
    marker = tmp_path / "marker"
    _fires(tmp_path)  # the payload is live
    (bare / "sharded" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ExportError, match="refusing to load pathlib"):
        export_checkpoint(bare, tmp_path / "x", base=other)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_tokenizer_round_trips_through_auto_tokenizer(run, tokenizer, tmp_path):
    out = export_checkpoint(run[0], tmp_path / "hf")
    auto = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS:
        assert auto(text).input_ids == tokenizer(text).input_ids, text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)


def test_a_damaged_latest_checkpoint_exports_the_one_before(tmp_path, tokenizer):
    step1 = _trained(1)
    save_checkpoint(tmp_path / "run", 1, step1, tokenizer, {"config": RUN_CFG})
    bad = save_checkpoint(tmp_path / "run", 2, _trained(2), tokenizer, {"config": RUN_CFG}) / "model" / \
        "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=rf"export: {bad}.*exporting .*step-1"):
        out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    got = _weights(out)
    assert all(torch.equal(got[k], v) for k, v in step1.state_dict().items())


def test_an_interrupted_export_leaves_nothing(run, tmp_path, monkeypatch):
    calls = []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = export.save_file
    monkeypatch.setattr(export, "save_file", fail_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(run[0], tmp_path / "out" / "hf", max_shard_bytes=SMALL_SHARD)
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == []  # no `hf`, no temporary folder


# -- bad input: an error naming the path before any weight is read -------------------------------------------------
def test_bad_sources_and_destinations_fail_before_any_weight_is_read(run, tmp_path, monkeypatch):
    folder, _ = run
    monkeypatch.setattr(export, "_load", lambda *a: pytest.fail("weights were read before the bad input was named"))
    hf_folder = save_model(_trained(1), tmp_path / "plain_hf")
    for name in ("empty", "full"):
        (tmp_path / name).mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (tmp_path / "missing", tmp_path / "o", {}, rf"{tmp_path / 'missing'}: no such run or checkpoint"),
        (tmp_path / "empty", tmp_path / "o", {}, rf"{tmp_path / 'empty'} is not a checkpoint"),
        (hf_folder, tmp_path / "o", {}, rf"{hf_folder} is an HF model folder already"),
        (folder, tmp_path / "full", {}, rf"--out {tmp_path / 'full'}: exists and is not empty; pass --overwrite"),
        (folder, tmp_path / "a_file", {}, rf"--out {tmp_path / 'a_file'}: exists and is not a folder"),
        (folder, tmp_path / "a_file" / "o", {}, rf"--out {tmp_path / 'a_file' / 'o'}: cannot write in"),
        (folder, folder, {"overwrite": True}, rf"--out {folder}: is the source"),
        (folder / "checkpoints" / "step-2", folder, {"overwrite": True}, rf"--out {folder}: is the source"),
        (folder, tmp_path / "o", {"lora": "merge"}, "no LoRA in this checkpoint"),
        (folder, tmp_path / "o", {"lora": "adapters"}, "no LoRA in this checkpoint"),
        (folder, tmp_path / "o", {"base": tmp_path}, "only a sharded .FSDP. or LoRA checkpoint needs it"),
        (folder, tmp_path / "o", {"max_shard_bytes": 0}, "max_shard_bytes must be >= 1"),
    ]
    for src, out, kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            export_checkpoint(src, out, **kwargs)
    assert not (tmp_path / "o").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_lora_config_without_adapters_is_refused(tmp_path, tokenizer):
    ckpt = save_checkpoint(tmp_path / "run", 1, _trained(1), tokenizer, {"config": LORA_CFG})  # model/, no adapter/
    with pytest.raises(ExportError, match=rf"{ckpt}: its run trained LoRA adapters but it holds no adapter/ folder"):
        export_checkpoint(ckpt, tmp_path / "o")


# -- LoRA ----------------------------------------------------------------------------------------------------------
def _lora_logits(model, tokenizer):
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        return model(ids, mask)  # [B, L, V]


def test_merged_lora_export_loads_in_transformers_with_the_lora_model_logits(lora_run, tokenizer, tmp_path):
    folder, model = lora_run
    out = export_checkpoint(folder, tmp_path / "hf")  # merging is the default for a LoRA run
    got = _weights(out)
    base = load_model(resolve_model_path(BASE)).state_dict()
    assert got.keys() == base.keys() and not any("lora_" in k for k in got)
    targets = {f"{n}.weight" for n in lora_modules(model)}
    assert len(targets) == 3 * model.config.num_hidden_layers  # q_proj, v_proj, down_proj of every layer
    assert all(torch.equal(got[k], v) for k, v in base.items() if k not in targets)  # the rest is the base, bitwise
    hf, real = _hf_logits(out, tokenizer)
    ours = _lora_logits(model, tokenizer)
    assert (hf[real] - ours[real]).abs().max() <= LOGIT_ATOL
    with torch.no_grad():
        plain = load_model(resolve_model_path(BASE))(*_batch(tokenizer))
    assert (plain[real] - ours[real]).abs().max() > 100 * LOGIT_ATOL  # the adapters matter: the test can fail
    again = _weights(export_checkpoint(folder, tmp_path / "merge", lora="merge"))
    assert all(torch.equal(again[k], v) for k, v in got.items())


def test_adapters_only_export_loads_with_peft_onto_the_base(lora_run, tokenizer, tmp_path, monkeypatch):
    folder, model = lora_run
    out = export_checkpoint(folder, tmp_path / "adapter", lora="adapters")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(resolve_model_path(BASE).resolve())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["down_proj", "q_proj", "v_proj"])
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True, attn_implementation="eager",
                                                          dtype=torch.float32).eval()  # the base from the config
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
    ours, real = _lora_logits(model, tokenizer), mask.bool()
    assert (got[real] - ours[real]).abs().max() <= LOGIT_ATOL
    auto = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert all(auto(t).input_ids == tokenizer(t).input_ids for t in TEXTS)
    # an interrupted adapters-only export leaves nothing either
    monkeypatch.setattr(export, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(folder, tmp_path / "cut" / "adapter", lora="adapters")
    assert list((tmp_path / "cut").iterdir()) == []


def test_bad_lora_checkpoints_fail_before_any_weight_is_read(lora_run, tokenizer, tmp_path, monkeypatch):
    _, model = lora_run
    monkeypatch.setattr(export, "load_model", lambda *a, **k: pytest.fail("weights were read before the error"))
    base = str(resolve_model_path(BASE))
    lora = LORA_CFG["model"]["lora"]
    bare = save_checkpoint(tmp_path / "bare", 1, model, tokenizer, {}, base_model=base)  # no run config
    rank = save_checkpoint(tmp_path / "rank", 1, model, tokenizer,
                           {"config": {**LORA_CFG, "model": {**LORA_CFG["model"], "lora": {**lora, "alpha": 16.0}}}})
    targets = save_checkpoint(tmp_path / "targets", 1, model, tokenizer, {"config": {
        **LORA_CFG, "model": {**LORA_CFG["model"], "lora": {**lora, "target_modules": "all-linear"}}}})
    other = save_model(build_tiny_model(config={**TINY_MODEL_CONFIG, "num_hidden_layers": 2}), tmp_path / "other",
                       tokenizer=tokenizer)
    cases = [
        (bare, {}, rf"{bare} is a LoRA checkpoint \(adapters alone\).*names no model.path: pass --base"),
        (rank, {}, rf"{rank / 'adapter' / 'adapter_config.json'}: r=4, lora_alpha=8.0, but the run's model.lora has "
                   "rank=4, alpha=16.0"),
        (targets, {}, rf"{targets / 'adapter' / 'adapter_model.safetensors'}: its adapters differ from the model's"),
        (bare, {"base": other, "lora": "adapters"}, r"module 'model\.layers\.2\..*' is not in this model"),
        (bare, {"base": tmp_path / "nowhere"}, rf"{bare} is a LoRA checkpoint .adapters alone.: its config.json and "
                                                "tokenizer come from --base, but model.path: .* is not a folder"),
    ]
    for src, kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            export_checkpoint(src, tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()  # the bare checkpoint exports with --base (its adapters need no run config)
    out = export_checkpoint(bare, tmp_path / "o", base=base, lora="adapters")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        resolve_model_path(BASE).resolve())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode bit; 'a_file/o' above covers root")
def test_a_read_only_destination_folder_is_named(run, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ExportError, match=rf"--out {tmp_path / 'ro' / 'o'}: cannot write in {tmp_path / 'ro'}"):
        export_checkpoint(run[0], tmp_path / "ro" / "o")


def test_cli_export(run, tmp_path, capsys):
    folder, model = run
    out = tmp_path / "hf"
    assert cli_main(["export", str(folder), "--out", str(out), "--max-shard-size", "1MB", "--dtype", "bfloat16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(list(out.glob("*.safetensors"))) > 1 and (got := _weights(out)).keys() == model.state_dict().keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.bfloat16())
               for k, v in model.state_dict().items())
    assert cli_main(["export", str(folder), "--out", str(out)]) == 2
    assert f"dash export: --out {out}: exists and is not empty" in capsys.readouterr().err
    assert cli_main(["export", str(folder), "--out", str(out), "--overwrite"]) == 0  # replaced: now one fp32 file
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "o"), "--merge-lora"]) == 2
    assert "--merge-lora: no LoRA in this checkpoint" in capsys.readouterr().err
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size: 'lots'" in capsys.readouterr().err


def test_cli_export_of_a_lora_run(lora_run, tmp_path, capsys):
    folder, model = lora_run
    with pytest.raises(SystemExit, match="--merge-lora and --adapters-only exclude each other"):
        cli_main(["export", str(folder), "--out", str(tmp_path / "o"), "--merge-lora", "--adapters-only"])
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert "export: HF model folder" in capsys.readouterr().out
    merged = _weights(tmp_path / "hf")
    assert all(v.dtype == torch.bfloat16 for v in merged.values()) and not any("lora_" in k for k in merged)
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "ad"), "--adapters-only"]) == 0
    assert f"export: peft adapter folder {tmp_path / 'ad'}" in capsys.readouterr().out
    saved = _weights(folder / "checkpoints" / "step-1" / "adapter")
    got = _weights(tmp_path / "ad")
    assert got.keys() == saved.keys() and all(torch.equal(got[k], v) for k, v in saved.items())
