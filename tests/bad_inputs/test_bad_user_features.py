"""The bad-input list of the user-facing features (LoRA, reward code, SFT data, eval sets), through the command line
in-process: each is exit status 2 with one line naming the key or the file and the limit, and no work done first (no
weights loaded where the check can precede them, no run folder, no export folder, an existing run left as it was).

The same checks at the Python level (ConfigError / ValueError) are tested next to each feature:
tests/model/test_lora.py, tests/rl/test_lora_train.py, tests/rewards/test_user_reward.py, tests/rl/test_sft_user.py,
tests/rl/test_eval_sets.py.
"""

from __future__ import annotations

import json
import re

import pytest

from dash.cli import main as cli_main
from dash.model_io import save_model
from dash.rl.run_dir import LOCK_FILE
from dash.rl.warmstart import TINY_MODEL_CONFIG, build_tiny_model
from dash.tokenizer import build_arith_tokenizer
from tests.tiny_models import save_tiny_dash_model

LORA = ["--model.lora.enabled=true", "--model.lora.rank=2", "--model.lora.alpha=4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dash_model(tmp_path_factory.mktemp("base") / "model", seed=1)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another base model: same tokenizer and module names, other MLP width (the adapters' shapes no longer fit)."""
    cfg = {**TINY_MODEL_CONFIG, "intermediate_size": TINY_MODEL_CONFIG["intermediate_size"] + 8}
    return save_model(build_tiny_model(seed=2, config=cfg), tmp_path_factory.mktemp("other") / "model",
                      tokenizer=build_arith_tokenizer())


def _forbid_loading(monkeypatch):
    import dash.model_io
    import dash.rl.sft_train

    fail = lambda *a, **k: pytest.fail("weights loaded before the check")  # noqa: E731
    monkeypatch.setattr(dash.model_io, "load_model", fail)  # the RL trainer's (model_io.load_model)
    monkeypatch.setattr(dash.rl.sft_train, "load_model", fail)  # dash sft's own import of it


def _one_error_line(capsys, match):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dash") and re.search(match, lines[0]), lines
    return lines[0]


@pytest.mark.parametrize("argv,match", [
    ([*LORA, "--model.lora.rank=0"], r"model\.lora\.rank must be >= 1, got 0"),
    ([*LORA, "--model.lora.rank=-3"], r"model\.lora\.rank must be >= 1, got -3"),
    ([*LORA, "--model.lora.target_modules=q_proj,qkv"], r"model\.lora\.target_modules: 'qkv' matches no module "
                                                       r"\(available: all-linear, q_proj, k_proj"),
    ([*LORA, "--train.parallel=fsdp"], r"model\.lora\.enabled=true with train\.parallel=fsdp is not supported"),
    (["--data.reward={tmp}/missing.py:f"], r"data\.reward: file .*missing\.py, function f: no such file"),
    (["--data.reward={tmp}/r.py:nope"], r"data\.reward: file .*r\.py, function nope: no such function "
                                        r"\(callables there: score\)"),
    (["--data.reward=math+{tmp}/r.py:score"], r"data\.reward: file .*r\.py, function score: wrong signature "
                                              r"score\(text\): expected TRL's fn\(prompts, completions"),
    (["--eval.sets.gsm8k.path={tmp}/gsm8k.jsonl"], r"eval\.sets\.gsm8k\.path: no such file .*gsm8k\.jsonl "
                                                   r"\(eval set 'gsm8k'\)"),
], ids=["lora_rank_zero", "lora_rank_negative", "lora_target_matches_nothing", "lora_with_fsdp",
        "reward_file_missing", "reward_function_missing", "reward_wrong_signature", "eval_set_file_missing"])
def test_train_refuses_before_loading_anything(model_dir, tmp_path, capsys, monkeypatch, argv, match):
    (tmp_path / "r.py").write_text("def score(text):\n    return 0.0\n")
    _forbid_loading(monkeypatch)
    run = tmp_path / "run"
    args = ["train", f"--model.path={model_dir}", "--model.device=cpu", f"--log.out_dir={run}"]
    assert cli_main(args + [a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    _one_error_line(capsys, match)
    assert not run.exists()


def test_sft_row_without_a_solution_names_the_file_line_and_field(model_dir, tmp_path, capsys, monkeypatch):
    rows = [{"prompt": f"{i}+1=", "solution": f"{i + 1}"} for i in range(4)]
    del rows[2]["solution"]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _forbid_loading(monkeypatch)
    run = tmp_path / "run"
    assert cli_main(["sft", f"--model.path={model_dir}", "--model.device=cpu", f"--sft.train_path={data}",
                     f"--log.out_dir={run}"]) == 2
    _one_error_line(capsys, r"sft\.jsonl line 3 has no solution field \(sft\.solution_field='solution'\)")
    assert not run.exists()


@pytest.fixture(scope="module")
def lora_run(model_dir, tmp_path_factory):
    """A one-step LoRA run on `model_dir` with its checkpoint (the adapters, in peft's layout)."""
    from tests.rl.test_trainer_e2e import _even_length  # noqa: F401  (registers the test reward)

    run = tmp_path_factory.mktemp("lora") / "run"
    assert cli_main(["train", f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=4",
                     "--data.reward=test_even_length", "--sampling.max_new_tokens=4", "--train.prompts_per_step=2",
                     "--train.group_size=2", "--train.steps=1", "--log.eval_every=0",
                     f"--log.out_dir={run}", *LORA]) == 0
    return run


def _tree(folder):
    """Every file's modification time, but the run lock's (a resume takes the lock before it loads the adapters)."""
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.slow  # trains one step to have a LoRA checkpoint
def test_adapter_for_another_base_is_refused_by_export_and_resume(lora_run, other_base, tmp_path, capsys):
    ckpt = lora_run / "checkpoints" / "step-1"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    before = _tree(lora_run)
    shape = r"adapter_model\.safetensors: base_model\.model\.model\.layers\.\d+\.mlp\.\w+_proj\.lora_[AB]\.weight " \
            r"has shape \[\d+, \d+\], the model needs \[\d+, \d+\]"

    out = tmp_path / "export"
    assert cli_main(["export", str(ckpt), "--out", str(out), "--base", str(other_base)]) == 2
    _one_error_line(capsys, shape)
    assert not out.exists()

    from tests.rl.test_trainer_e2e import _even_length  # noqa: F401, F811

    assert cli_main(["train", f"--model.path={other_base}", "--model.device=cpu", "--data.test_size=4",
                     "--data.reward=test_even_length", "--sampling.max_new_tokens=4", "--train.prompts_per_step=2",
                     "--train.group_size=2", "--train.steps=2", "--log.eval_every=0", f"--log.out_dir={lora_run}",
                     f"--resume={lora_run}", *LORA]) == 2
    _one_error_line(capsys, r"--resume: .*" + shape)
    assert _tree(lora_run) == before  # the run was not touched: no step, no log line, no checkpoint


@pytest.mark.slow  # trains one SFT step to have a LoRA checkpoint
def test_sft_resume_with_an_adapter_for_another_base_is_refused(model_dir, other_base, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "solution": f"{i + 1}"}) + "\n" for i in range(4)))
    args = ["sft", "--model.device=cpu", f"--sft.train_path={data}", "--sft.batch_size=4", f"--log.out_dir={tmp_path}",
            *LORA]
    assert cli_main([*args, f"--model.path={model_dir}", "--sft.steps=1"]) == 0
    run = tmp_path / "sft"
    before = _tree(run)
    capsys.readouterr()
    assert cli_main([*args, f"--model.path={other_base}", "--sft.steps=2", "--resume", str(run)]) == 2
    _one_error_line(capsys, r"--resume: .*adapter_model\.safetensors: base_model\.model\.model\.layers\.\d+\.mlp\."
                            r"\w+_proj\.lora_[AB]\.weight has shape \[\d+, \d+\], the model needs \[\d+, \d+\]")
    assert _tree(run) == before
