"""Rewards and the command line. A reward value that is not a number, not finite, or beyond +-MAX_ABS_REWARD scores 0
and is counted (a finite 1e308 used to turn every advantage of the step into NaN and drop every sample, silently);
the CLI answers bad input with one line naming it and exit status 2, before loading anything it does not need."""

from __future__ import annotations

import decimal
import fractions
import math
import re

import numpy as np
import pytest
import torch

from dash.cli import main as cli_main
from dash.config import load_config
from dash.rewards import SafeReward, register_reward
from dash.rewards.safe_call import MAX_ABS_REWARD
from dash.rl.rollout import group_advantages, zero_non_finite


@pytest.mark.parametrize("value", [1e308, -1e308, 1e7, -(MAX_ABS_REWARD * 1.5), math.inf, -math.inf, math.nan, "1.0",
                                   None, [1.0], {"r": 1}, 10**400, fractions.Fraction(10**400, 3),
                                   decimal.Decimal("0.5"), 1j, np.float64(1e300)],
                         ids=lambda v: f"{type(v).__name__}:{v!r:.12}")
def test_unusable_reward_value_scores_zero_and_is_counted(value):
    safe = SafeReward(lambda c, a: value, name="probe")
    assert safe("x", "y") == 0.0
    assert safe.stats.invalid == 1 and safe.stats.first_failures[0].startswith("invalid: probe returned")


def test_out_of_bound_reward_names_the_bound():
    safe = SafeReward(lambda c, a: 1e308)
    safe("x", "y")
    assert "beyond the bound +-1e+06" in safe.stats.first_failures[0]


@pytest.mark.parametrize("value", [MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.5, True, fractions.Fraction(1, 2),
                                   np.float32(0.25), -3])
def test_rewards_within_the_bound_pass(value):
    safe = SafeReward(lambda c, a: value)
    assert safe("x", "y") == float(value) and safe.stats.failures == 0


@pytest.mark.parametrize("max_abs", [0, -1, math.inf, math.nan])
def test_reward_bound_must_be_a_positive_number(max_abs):
    with pytest.raises(ValueError, match="SafeReward max_abs must be a finite number > 0"):
        SafeReward(lambda c, a: 0.0, max_abs=max_abs)


def test_bounded_rewards_give_finite_advantages_and_others_are_zeroed_and_counted():
    bounded = torch.tensor([MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, 1.0])
    assert torch.isfinite(group_advantages(bounded, 4)).all()
    rewards = torch.tensor([1e308, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # fp32: the first group holds an inf
    adv, count = zero_non_finite(group_advantages(rewards, 4))
    assert count == 4 and torch.equal(adv[:4], torch.zeros(4))
    assert torch.equal(adv[4:], group_advantages(rewards[4:], 4))  # the other group is untouched


def _huge_on_odd_length(completion: str, answer: str) -> float:
    return 1e308 if len(completion) % 2 else 1.0


register_reward("test_huge_reward", _huge_on_odd_length)


def _tiny_run(tmp_path, *extra: str) -> list[str]:
    return ["--model.device=cpu", "--data.test_size=4", "--sampling.max_new_tokens=4", "--train.prompts_per_step=4",
            "--train.micro_batch_size=4", "--train.steps=1", f"--log.out_dir={tmp_path / 'run'}", *extra]


def test_a_step_with_a_huge_reward_goes_on_and_counts_it(tmp_path):
    from dash.rl.trainer import Trainer

    trainer = Trainer(load_config(None, _tiny_run(tmp_path, "--data.reward=test_huge_reward")), quiet=True)
    trainer.setup()
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    stats = trainer.sampler.reward_stats
    assert stats.invalid > 0 and metrics["reward/failed_calls"] == stats.invalid == stats.failures
    assert metrics["rollout/non_finite_adv"] == 0 and not metrics["train/skipped_update"]
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


# ---------------------------------------------------------------- the command line: one line, exit status 2


def _forbid_loading(monkeypatch):
    import dash.model_io

    monkeypatch.setattr(dash.model_io, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))


@pytest.mark.parametrize("argv,match", [
    (["train", "--config", "{tmp}/missing.yaml"], r"config file .*missing\.yaml does not exist"),
    (["train", "--config", "{tmp}/bad.yaml"], r"bad\.yaml:2:1: YAML error"),
    (["train", "--sampling.temperature=0"], r"sampling\.temperature=0 samples greedily"),
    (["train", "--log.eval_every=-1"], r"log\.eval_every must be >= 0"),
    (["eval", "--train.lrr=1"], r"unknown config key train\.lrr"),
    (["train", "--sampling.num_pages=1", "--sampling.page_size=4", "--sampling.max_new_tokens=8",
      "--model.device=cpu", "--log.out_dir={tmp}/run"], r"leaves no room for a prompt"),
    (["sample", "--prompt", "hello"], r"--prompt: the tokenizer cannot encode 'hello': characters \['e', 'h', 'l'"),
    (["sample", "--prompt", "1+1=", "--prompt", "1+x="], r"cannot encode '1\+x=': characters \['x'\]"),
    (["sample", "--prompt", ""], r"--prompt: '' encodes to no tokens"),
    (["sample", "--prompt", "1+1=", "--n", "0"], r"--n must be >= 1"),
    (["smoke", "--data.task=jsonl", "--data.train_path={tmp}/x.jsonl"], r"only the built-in tasks \(.arith., .scratchpad.\)"),
    (["train", "--model.path={tmp}/nope"], r"model\.path: .*nope is not a folder"),
    (["sample", "--prompt", "1+1=", "--model.path=builtin:nope"], r"model\.path: no built-in model 'nope'"),
    pytest.param(["train", "--model.device=cuda"], r"model\.device='cuda' but this torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["train", "--model.device=cpu", "--data.task=jsonl", "--data.train_path={tmp}/bad.yaml",
      "--log.out_dir={tmp}/run"], r"data: .*bad\.yaml has no usable rows \(.*bad_record=2"),
], ids=["missing_config", "bad_yaml", "greedy_train", "negative_eval_every", "unknown_key", "pool_too_small",
        "prompt_outside_vocab", "second_prompt_outside_vocab", "empty_prompt", "zero_samples", "smoke_jsonl",
        "model_path_missing", "builtin_missing", "no_cuda", "no_usable_rows"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, request, argv, match):
    (tmp_path / "bad.yaml").write_text("train:\n\tsteps: 3\n")
    if "no_usable_rows" not in request.node.name:  # rows are counted with the tokenizer, after the weights load
        _forbid_loading(monkeypatch)
    assert cli_main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 + ("no_usable_rows" in request.node.name), lines  # there the data summary comes first
    assert lines[-1].startswith("dash") and re.search(match, lines[-1]), lines
    if "no_usable_rows" not in request.node.name:
        assert not (tmp_path / "run").exists()  # nothing written before the error


def test_cli_sample_takes_text_overrides_as_given_and_eval_may_be_greedy(tmp_path, capsys):
    common = ["--model.device=cpu", "--sampling.max_new_tokens=3", "--data.prompt_template={prompt}"]
    assert cli_main(["sample", "--prompt", "12+34*56=", *common]) == 0
    assert capsys.readouterr().out.startswith("'12+34*56=' -> ")
    assert cli_main(["eval", *common, "--sampling.temperature=0", "--data.test_size=4",
                     f"--log.out_dir={tmp_path / 'ev'}"]) == 0
    assert re.search(r"^heldout +4 ", capsys.readouterr().out, re.M)
