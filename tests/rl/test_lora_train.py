"""LoRA runs of the trainer (model.lora): only the adapters train (base weights bitwise unchanged, optimizer state for
the adapters alone), through the fused loss; checkpoints hold the adapters in peft's layout and resume bitwise; the
KL reference is the base seen with adapters off (no copy); mismatched resumes and FSDP are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from dash.config import ConfigError, load_config
from dash.lora import BaseModelView, lora_modules
from dash.rl.checkpoint import ADAPTER_DIR, MODEL_DIR
from dash.rl.trainer import Trainer
from tests.rl.test_trainer_e2e import _cfg, model_dir  # noqa: F401  (model_dir: a fixture used below)

LORA = ["--model.lora.enabled=true", "--model.lora.rank=4", "--model.lora.alpha=8"]


def _state(model, adapters: bool):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ("lora_" in k) == adapters}


@pytest.mark.parametrize("algorithm,dtype", [("dash", "float32"), ("grpo", "bfloat16")])
def test_only_adapters_train(model_dir, tmp_path, algorithm, dtype):  # noqa: F811
    t = Trainer(_cfg(model_dir, tmp_path, *LORA, f"--train.algorithm={algorithm}", f"--model.dtype={dtype}",
                     "--model.lora.dropout=0.1"), quiet=True)
    t.setup()
    base, adapters = _state(t.model, False), _state(t.model, True)
    n_adapter_tensors = 2 * len(lora_modules(t.model))
    assert n_adapter_tensors == 2 * 7 * t.model.config.num_hidden_layers  # all-linear by default
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    assert len(params) == n_adapter_tensors  # the optimizer (and its state) holds the adapters alone
    for _ in range(2):
        t.train_step()
    t.close()
    after_base, after_adapters = _state(t.model, False), _state(t.model, True)
    assert all(torch.equal(base[k], after_base[k]) for k in base), "a base weight changed"
    moved = [k for k in adapters if not torch.equal(adapters[k], after_adapters[k])]
    assert any(".lora_B." in k for k in moved), "no adapter was updated"
    assert not any(p.requires_grad for n, p in t.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_checkpoint_resumes_bitwise(model_dir, tmp_path, dtype):  # noqa: F811
    cfg = lambda out: _cfg(model_dir, out, *LORA, f"--model.dtype={dtype}")  # noqa: E731
    straight = Trainer(cfg(tmp_path / "a"), quiet=True)
    straight.setup()
    for _ in range(4):
        straight.train_step()
    expected = _state(straight.model, True)
    straight.close()

    first = Trainer(cfg(tmp_path / "b"), quiet=True)
    first.setup()
    first.train_step()
    first.train_step()
    path = first.save_checkpoint()
    first.close()
    assert (path / ADAPTER_DIR / "adapter_model.safetensors").is_file() and not (path / MODEL_DIR).exists()
    assert json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(model_dir)
    second = Trainer(cfg(tmp_path / "b"), quiet=True)
    second.setup(resume=str(tmp_path / "b"))
    assert second.step == 2
    second.train_step()
    second.train_step()
    got = _state(second.model, True)
    second.close()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs after resume"


def test_kl_reference_is_the_base_without_a_copy(model_dir, tmp_path):  # noqa: F811
    t = Trainer(_cfg(model_dir, tmp_path, *LORA, "--loss.beta=0.05"), quiet=True)
    t.setup()
    assert isinstance(t.ref_model, BaseModelView) and t.ref_model.model is t.model
    metrics = t.train_step()
    t.close()
    assert "loss/kl" in metrics and torch.isfinite(torch.tensor(metrics["loss/kl"]))


def test_mismatched_resume_and_fsdp_are_refused(model_dir, tmp_path):  # noqa: F811
    t = Trainer(_cfg(model_dir, tmp_path, *LORA), quiet=True)
    t.setup()
    t.train_step()
    t.save_checkpoint()
    t.close()
    plain = Trainer(_cfg(model_dir, tmp_path), quiet=True)
    with pytest.raises(ConfigError, match=r"written with model.lora.enabled=True; resume it with the same"):
        plain.setup(resume=str(tmp_path))
    plain.close()
    with pytest.raises(ConfigError, match=r"model.lora.enabled=true with train.parallel=fsdp is not supported"):
        load_config(None, [*LORA, "--train.parallel=fsdp"])
