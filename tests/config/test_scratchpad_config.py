"""`data.task: scratchpad` in the typed config: the task's own reward by default, an explicit other reward kept, the
demo preset's budgets equal to the task's."""

from pathlib import Path

import pytest
import yaml

from dash.config import BUILTIN_TASKS, ConfigError, config_to_dict, load_config

PRESET = Path(__file__).parents[2] / "configs/tiny-scratchpad.yaml"


def test_scratchpad_is_a_builtin_task_without_files():
    cfg = load_config(None, ["--data.task=scratchpad"])
    assert "scratchpad" in BUILTIN_TASKS
    assert cfg.data.task == "scratchpad" and cfg.data.train_path is None


def test_default_reward_becomes_the_task_reward():
    assert load_config(None, []).data.reward == "arith"
    assert load_config(None, ["--data.task=scratchpad"]).data.reward == "scratchpad"
    # `arith` cannot be told apart from the default, so it too means the task's reward (DataConfig.reward's docstring)
    assert load_config(None, ["--data.task=scratchpad", "--data.reward=arith"]).data.reward == "scratchpad"


@pytest.mark.parametrize("reward", ["format", "gsm8k", "scratchpad+format"])
def test_an_explicit_other_reward_is_kept(reward, tmp_path):
    assert load_config(None, ["--data.task=scratchpad", f"--data.reward={reward}"]).data.reward == reward
    preset = tmp_path / "p.yaml"
    preset.write_text(f"data:\n  reward: {reward}\n  task: scratchpad\n")
    assert load_config(preset).data.reward == reward


def test_an_unknown_reward_is_still_refused():
    with pytest.raises(ConfigError, match=r"data\.reward"):
        load_config(None, ["--data.task=scratchpad", "--data.reward=no_such_reward"])


def test_round_trip_keeps_the_task_and_reward(tmp_path):
    cfg = load_config(None, ["--data.task=scratchpad", "--data.seed=3"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


def test_demo_preset_matches_the_task():
    from dash.tasks.scratchpad import ScratchpadTaskConfig

    cfg = load_config(PRESET)
    task = ScratchpadTaskConfig(seed=cfg.data.seed, test_size=cfg.data.test_size, train_size=0)
    assert (cfg.data.task, cfg.data.reward) == ("scratchpad", "scratchpad")
    assert cfg.sampling.max_new_tokens == task.max_new_tokens  # the longest scratchpad fits, EOS included
    assert cfg.model.path == "builtin:tiny-scratchpad-sft"
