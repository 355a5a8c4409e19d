"""The RL learning-rate schedule (dash/rl/optim.py lr_factor / build_optimizer): warm-up, linear and cosine decay,
stepped per optimizer step, exact across a checkpoint, logged as train/lr, and bad values refused."""

import json
import math

import pytest
import torch

from dash.config import ConfigError, DashConfig, TrainConfig, load_config
from dash.rl.optim import build_optimizer, lr_factor
from dash.rl.state_io import load_state, save_state

LR = 1e-3
# The reference below is the same maths written independently, in another order of operations: the two may differ by
# a few ulps of a double (~1e-16 relative), nowhere near this tolerance, and far below any schedule error (>= 1e-3).
REL = 1e-12


def reference_lr(i: int, total: int, warmup: int, schedule: str, m: float) -> float:
    """Closed form of the lr of optimizer step i (0-based)."""
    if i < warmup:
        return LR * (i + 1) / warmup
    p = min((i - warmup) / max(total - warmup, 1), 1.0)
    shape = {"constant": 1.0, "linear": 1.0 - p, "cosine": (1.0 + math.cos(math.pi * p)) / 2}[schedule]
    return LR * (shape if schedule == "constant" else m + (1.0 - m) * shape)


def _optimizer(steps=10, **train):
    cfg = DashConfig(train=TrainConfig(steps=steps, lr=LR, prompts_per_step=4, group_size=2, micro_batch_size=2,
                                       **train))
    model = torch.nn.Linear(3, 2)
    return build_optimizer(cfg, model), model


def _lr_sequence(opt, sched, n):
    """The lr each of n optimizer steps uses (read before the step, as PolicyUpdate.step logs it)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,min_ratio", [(0, 0.0), (3, 0.0), (4, 0.1)])
def test_lr_of_every_step_matches_the_closed_form(schedule, warmup, min_ratio):
    (opt, sched), _ = _optimizer(steps=10, lr_schedule=schedule, warmup_steps=warmup, min_lr_ratio=min_ratio)
    got = _lr_sequence(opt, sched, 10)
    want = [reference_lr(i, 10, warmup, schedule, min_ratio) for i in range(10)]
    assert got == pytest.approx(want, rel=REL, abs=0.0)
    if warmup:
        assert got[warmup - 1] == pytest.approx(LR, rel=REL) and got[0] == pytest.approx(LR / warmup, rel=REL)
    if schedule == "cosine":  # halfway through the decay: halfway between lr and min_ratio x lr
        assert lr_factor(warmup + 3, warmup + 6, warmup, "cosine", min_ratio) == pytest.approx((1 + min_ratio) / 2)


def test_defaults_keep_the_schedules_that_existed_bitwise():
    """constant: lr at every step; linear without warm-up: the former lambda max(0, 1 - i / total), to the bit."""
    (opt, sched), _ = _optimizer(steps=7)
    assert _lr_sequence(opt, sched, 7) == [LR] * 7
    (opt, sched), _ = _optimizer(steps=7, lr_schedule="linear")
    assert _lr_sequence(opt, sched, 7) == [LR * max(0.0, 1.0 - i / 7) for i in range(7)]


def test_schedule_counts_optimizer_steps_with_ppo():
    """3 steps x 2 epochs x 2 mini-batches = 12 optimizer steps: the decay spans all of them."""
    (opt, sched), _ = _optimizer(steps=3, lr_schedule="linear", ppo_epochs=2, ppo_minibatches=2)
    got = _lr_sequence(opt, sched, 12)
    assert got == [LR * (1.0 - i / 12) for i in range(12)]


def test_resume_mid_warmup_continues_the_same_lr_sequence(tmp_path):
    """The scheduler and optimizer state go through the checkpoint's own state files (dash/rl/state_io.py)."""
    train = dict(lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    (opt, sched), _ = _optimizer(steps=10, **train)
    straight = _lr_sequence(opt, sched, 10)

    (opt, sched), _ = _optimizer(steps=10, **train)
    first = _lr_sequence(opt, sched, 2)  # stop mid-warm-up
    save_state(tmp_path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    (opt2, sched2), _ = _optimizer(steps=10, **train)
    state = load_state(tmp_path)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert first + _lr_sequence(opt2, sched2, 8) == straight  # exact: the same floats, not approximately


@pytest.mark.parametrize("override,match", [
    ("--train.warmup_steps=-1", r"train\.warmup_steps must be >= 0, got -1"),
    ("--train.min_lr_ratio=1.5", r"train\.min_lr_ratio must be in \[0, 1\], got 1\.5"),
    ("--train.min_lr_ratio=-0.1", r"train\.min_lr_ratio must be in \[0, 1\], got -0\.1"),
])
def test_bad_schedule_values_name_the_key_and_the_limit(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.slow
def test_trainer_logs_train_lr_and_resumes_mid_warmup_exactly(tmp_path):
    """End to end: train/lr of every step is the closed form (the lr that step's update used), in metrics.jsonl
    too; a run checkpointed mid-warm-up and resumed gives the same lr sequence and bitwise the same weights."""
    from dash.rewards import register_reward
    from dash.rl.trainer import Trainer
    from tests.tiny_models import save_tiny_dash_model

    register_reward("test_lr_even_length", lambda completion, answer: float(len(completion) % 2 == 0))
    model_dir = save_tiny_dash_model(tmp_path / "model", seed=1)

    def cfg(out):
        return load_config(None, [
            f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=16",
            "--data.reward=test_lr_even_length", "--sampling.max_new_tokens=6", "--train.prompts_per_step=8",
            "--train.group_size=4", "--train.micro_batch_size=8", "--train.steps=5", f"--train.lr={LR}",
            "--train.lr_schedule=cosine", "--train.warmup_steps=3", "--train.min_lr_ratio=0.2",
            "--log.eval_every=0", f"--log.out_dir={out}"])

    straight = Trainer(cfg(tmp_path / "a"), quiet=True)
    straight.setup()
    lrs = [straight.train_step()["train/lr"] for _ in range(5)]
    weights = {k: v.clone() for k, v in straight.model.state_dict().items()}
    straight.close()
    assert lrs == pytest.approx([reference_lr(i, 5, 3, "cosine", 0.2) for i in range(5)], rel=REL, abs=0.0)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/lr"] for row in logged if "train/lr" in row] == lrs

    first = Trainer(cfg(tmp_path / "b"), quiet=True)
    first.setup()
    resumed = [first.train_step()["train/lr"] for _ in range(2)]  # checkpoint inside the 3-step warm-up
    first.save_checkpoint()
    first.close()
    second = Trainer(cfg(tmp_path / "b"), quiet=True)
    second.setup(resume=str(tmp_path / "b"))
    resumed += [second.train_step()["train/lr"] for _ in range(3)]
    assert resumed == lrs
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} differs after resume"
    second.close()
