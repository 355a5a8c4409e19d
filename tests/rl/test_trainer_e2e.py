"""The trainer end to end on a random tiny model: exact resume, filtering, failing rewards, non-finite updates, CLI."""

import json
import re

import pytest
import torch

from dash.cli import main as cli_main
from dash.config import ConfigError, load_config
from dash.rewards import register_reward
from dash.rl.optim import MasterWeightAdamW
from dash.rl.trainer import Trainer
from dash.rl.warmstart import build_tiny_model
from tests.tiny_models import save_tiny_dash_model


def _even_length(completion: str, answer: str) -> float:
    """A reward a random model earns half the time: groups are mixed, so filtering and updates both happen."""
    return float(len(completion) % 2 == 0)


def _flaky(completion: str, answer: str) -> float:
    if len(completion) % 3 == 0:
        raise RuntimeError("reward checker crashed")
    return float(len(completion) % 2 == 0)


register_reward("test_even_length", _even_length)
register_reward("test_flaky", _flaky)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dash_model(tmp_path_factory.mktemp("tiny-random") / "model", seed=1)


def _cfg(model_dir, out_dir, *extra):
    return load_config(None, [
        f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=16", "--data.reward=test_even_length",
        "--sampling.max_new_tokens=6", "--train.prompts_per_step=8", "--train.group_size=4",
        "--train.micro_batch_size=8", "--train.steps=4", "--train.lr=1e-3", "--train.lr_schedule=linear",
        "--log.eval_every=0", f"--log.out_dir={out_dir}", *extra])


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_continues_bitwise(model_dir, tmp_path, dtype):
    """bfloat16: AdamW steps fp32 master weights (dash/rl/optim.py) and the checkpoint carries them."""
    straight = Trainer(_cfg(model_dir, tmp_path / "a", f"--model.dtype={dtype}"), quiet=True)
    straight.setup()
    assert isinstance(straight.optimizer, MasterWeightAdamW) == (dtype == "bfloat16")
    for _ in range(4):
        straight.train_step()
    expected = _weights(straight.model)
    straight.close()

    first = Trainer(_cfg(model_dir, tmp_path / "b", f"--model.dtype={dtype}"), quiet=True)
    first.setup()
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.close()
    second = Trainer(_cfg(model_dir, tmp_path / "b", f"--model.dtype={dtype}"), quiet=True)
    second.setup(resume=str(tmp_path / "b"))
    assert second.step == 2
    second.train()  # runs steps 3 and 4, then evaluates and saves
    got = _weights(second.model)
    second.close()
    start = {k: v.to(expected[k].dtype) for k, v in _weights(build_tiny_model(seed=1)).items()}
    assert any(not torch.equal(expected[k], start[k]) for k in expected), "no update"
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs after resume"
    latest = (tmp_path / "b" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-4"


@pytest.mark.slow
def test_dash_filters_before_training_and_counts_it(model_dir, tmp_path):
    tr = Trainer(_cfg(model_dir, tmp_path, "--train.algorithm=dash"), quiet=True)
    tr.setup()
    m = tr.train_step()
    tr.close()
    S = 8 * 4
    assert m["rollout/sampling_calls"] == 1
    assert m["train/skipped_samples"] == round((1 - m["rollout/kept_frac"]) * S)
    assert 0 < m["rollout/kept_frac"] < 1  # the even-length reward gives both mixed and uniform groups here
    grpo = Trainer(_cfg(model_dir, tmp_path / "g", "--train.algorithm=grpo"), quiet=True)
    grpo.setup()
    g = grpo.train_step()
    grpo.close()
    assert g["rollout/sampling_calls"] == S // 8 and g["rollout/kept_frac"] == 1.0
    assert g["rollout/reward_mean"] == m["rollout/reward_mean"]  # same seeds -> same completions


def test_failing_reward_scores_zero_and_the_run_goes_on(model_dir, tmp_path):
    tr = Trainer(_cfg(model_dir, tmp_path, "--data.reward=test_flaky"), quiet=True)
    tr.setup()
    m = tr.train_step()
    tr.close()
    assert m["reward/failed_calls"] > 0


def test_non_finite_loss_skips_the_update(model_dir, tmp_path, monkeypatch):
    import dash.rl.policy_update

    def nan_loss(hidden, *args, **kwargs):
        return hidden.sum() * float("nan"), {}

    monkeypatch.setattr(dash.rl.policy_update, "fused_policy_loss", nan_loss)  # the name the update calls
    tr = Trainer(_cfg(model_dir, tmp_path), quiet=True)
    tr.setup()
    before = _weights(tr.model)
    m = tr.train_step()
    after = _weights(tr.model)
    tr.close()
    assert m["train/micro_batches"] > 0 and m["train/non_finite_losses"] == m["train/micro_batches"]
    assert m["train/skipped_update"] == 1.0
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_cli_train_writes_metrics_and_checkpoint(model_dir, tmp_path):
    out = tmp_path / "cli"
    rc = cli_main(["train", f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=8",
                   "--data.reward=test_even_length", "--sampling.max_new_tokens=5", "--train.prompts_per_step=4",
                   "--train.micro_batch_size=4", "--train.steps=2", f"--log.out_dir={out}", "--log.eval_every=1"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/heldout/greedy_acc" in x for x in lines) == 2
    assert sum("time/step_s" in x for x in lines) == 2
    assert (out / "checkpoints" / "step-2" / "model" / "model.safetensors").is_file()
    assert cli_main(["train", "--train.stepz=3"]) == 2  # config errors name the key and exit 2


@pytest.mark.slow
@pytest.mark.parametrize("extra,updates", [(("--train.ppo_epochs=2",), 2), (("--train.ppo_minibatches=2",), 2),
                                            (("--train.ppo_epochs=2", "--train.old_logp=sampler"), 2)])
def test_ppo_multi_and_mini_take_several_clipped_updates(model_dir, tmp_path, extra, updates):
    tr = Trainer(_cfg(model_dir, tmp_path, "--train.lr=5e-3", "--loss.eps_low=0.01", "--loss.eps_high=0.01", *extra),
                 quiet=True)
    tr.setup()
    m = tr.train_step()
    tr.close()
    assert tr.scheduler.last_epoch == updates  # one scheduler tick per optimizer step
    # after the first update the ratio moves away from 1, so a tight clip range clips some tokens
    assert m["loss/clip_frac"] > 0


@pytest.mark.slow
def test_kl_reference_only_built_when_beta_positive_and_tensorboard(model_dir, tmp_path):
    tr = Trainer(_cfg(model_dir, tmp_path / "nokl"), quiet=True)
    tr.setup()
    assert tr.ref_model is None
    tr.close()
    tr = Trainer(_cfg(model_dir, tmp_path / "kl", "--loss.beta=0.04", "--log.tensorboard=true"), quiet=True)
    tr.setup()
    assert tr.ref_model is not None and all(not p.requires_grad for p in tr.ref_model.parameters())
    m = tr.train_step()
    tr.close()
    assert m["loss/kl"] >= 0
    assert list((tmp_path / "kl" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cli_eval_sample_and_sft(model_dir, tmp_path, capsys):
    common = [f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=8", "--sampling.max_new_tokens=5"]
    assert cli_main(["eval", *common, f"--log.out_dir={tmp_path / 'ev'}"]) == 0
    assert re.search(r"^heldout +8 ", capsys.readouterr().out, re.M)
    assert cli_main(["sample", *common, "--prompt", "12+34*56=", "--n", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("'12+34*56='")]
    assert len(lines) == 2 and all("(stop)" in x or "(length)" in x for x in lines)
    out = tmp_path / "sft"
    assert cli_main(["sft", "--sft.steps=3", "--sft.batch_size=8", "--data.test_size=8", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "warmstart.json").is_file()
    assert "sft: greedy test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_gradient_checkpointing_trains_to_the_same_weights(model_dir, tmp_path):
    """train.gradient_checkpointing reaches the training model (not the sampler's no-grad forwards) and changes no
    update: two steps land on bitwise the same weights as without it."""
    runs = {}
    for flag in ("false", "true"):
        tr = Trainer(_cfg(model_dir, tmp_path / flag, f"--train.gradient_checkpointing={flag}"), quiet=True)
        tr.setup()
        assert tr.model.gradient_checkpointing is (flag == "true")
        tr.train_step()
        tr.train_step()
        runs[flag] = _weights(tr.model)
        tr.close()
    assert all(torch.equal(runs["false"][k], runs["true"][k]) for k in runs["false"])


@pytest.mark.parametrize("override,match", [
    ("--sampling.max_new_tokens=100000", "sampling.max_new_tokens=100000 must be below the model's context"),
    ("--data.task=jsonl", "data.train_path: no such file"),
])
def test_settings_the_model_or_disk_contradict_fail_before_loading(model_dir, tmp_path, monkeypatch, override, match):
    import dash.model_io

    monkeypatch.setattr(dash.model_io, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    extra = [override] + (["--data.train_path=/nonexistent/train.jsonl"] if "jsonl" in override else [])
    tr = Trainer(_cfg(model_dir, tmp_path, *extra), quiet=True)
    with pytest.raises(ConfigError, match=match):
        tr.setup()


def test_resume_with_a_changed_config_warns_naming_the_keys(model_dir, tmp_path):
    first = Trainer(_cfg(model_dir, tmp_path), quiet=True)
    first.setup()
    first.train_step()
    first.save_checkpoint()
    first.close()
    again = Trainer(_cfg(model_dir, tmp_path, "--train.seed=5", "--log.eval_every=2"), quiet=True)
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's in train\.seed \(0 -> 5\); the run"):
        again.setup(resume=str(tmp_path))
    again.close()
