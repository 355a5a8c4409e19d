"""log.wandb: metrics go to a Weights & Biases run (offline here: WANDB_MODE=offline, files under the run folder),
only on rank 0, and a missing wandb package is a clear error before any work."""

import importlib.util
import sys
from pathlib import Path

import pytest

from dash.config import ConfigError, load_config
from dash.rl.metrics import MetricsLogger
from dash.rl.trainer import Trainer
from tests.tiny_models import save_tiny_dash_model


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed: log.wandb untested here (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account: the run stays in <out_dir>/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("RANK", raising=False)


def _run_file(out_dir: Path) -> bytes:
    """The offline run's record log (protobuf records; metric keys and JSON values are stored as plain text)."""
    import wandb

    # wandb 0.31 writes a process's second and later finished runs asynchronously (the first one before finish()
    # returns); teardown waits for its service to write them all, as the exit of a training process does.
    wandb.teardown()
    files = sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {out_dir}/wandb, found {files}"
    return files[0].read_bytes()


@pytest.mark.slow  # importing wandb and starting its service: ~10 s here
def test_logged_metrics_reach_the_offline_run(tmp_path, offline_wandb):
    out = tmp_path / "run"
    logger = MetricsLogger(out, wandb=True, wandb_project="dash-test", run_config={"train": {"lr": 0.000123}})
    logger.log(1, {"rollout/reward_mean": 0.375, "train/loss_step": 1.5, "eval/not_finite": float("nan")})
    logger.log(2, {"rollout/reward_mean": 0.625})
    logger.close()
    data = _run_file(out)
    for text in (b"rollout/reward_mean", b"0.375", b"0.625", b"train/loss_step", b"0.000123"):
        assert text in data, f"{text!r} missing from the W&B run file"
    assert b"eval/not_finite" not in data  # non-finite values are left out, as for TensorBoard
    assert (out / "metrics.jsonl").read_text().count("\n") == 2  # the JSONL log is written as before


def test_only_rank_0_opens_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it on the second process
    monkeypatch.setitem(sys.modules, "wandb", None)  # any attempt to import wandb would raise: none is made
    logger = MetricsLogger(tmp_path / "run", wandb=True)
    logger.log(1, {"rollout/reward_mean": 0.5})
    logger.close()
    assert not (tmp_path / "run" / "wandb").exists()


def test_missing_wandb_is_an_error_naming_the_key(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log\.wandb=true needs the wandb package, which is not installed: "
                                          r"pip install wandb"):
        load_config(None, ["--log.wandb=true"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"log\.wandb=true needs the wandb package: pip install wandb"):
        MetricsLogger(tmp_path / "run", wandb=True)


@pytest.mark.slow
def test_trainer_logs_its_step_metrics_and_config_to_wandb(tmp_path, offline_wandb):
    model = save_tiny_dash_model(tmp_path / "model", seed=1)
    out = tmp_path / "out"
    cfg = load_config(None, [f"--model.path={model}", "--model.device=cpu", "--data.test_size=4",
                             "--sampling.max_new_tokens=4", "--train.prompts_per_step=2", "--train.group_size=4",
                             "--train.micro_batch_size=4", "--train.steps=1", "--log.eval_every=0",
                             f"--log.out_dir={out}", "--log.wandb=true", "--log.wandb_project=dash-test"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    metrics = trainer.train_step()
    trainer.close()
    data = _run_file(out)
    assert b"rollout/reward_mean" in data and b"time/step_s" in data and "rollout/reward_mean" in metrics
    assert b"prompts_per_step" in data  # the run's config
