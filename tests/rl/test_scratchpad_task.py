"""data.task=scratchpad through the engine: load_task's prompts and limits, a trainer run, the warm-start recipe
(`python -m dash.rl.warmstart --task scratchpad`, `dash sft`) and `dash smoke`, each on the scratchpad reward."""

import json

import pytest

from dash.cli import main as cli_main
from dash.config import ConfigError, load_config
from dash.rl.task_data import load_task
from dash.tasks.scratchpad import ScratchpadTaskConfig, chain_solution, make_scratchpad_splits, scratchpad_reward
from dash.tokenizer import build_arith_tokenizer
from tests.tiny_models import save_tiny_dash_model

MAX_NEW = ScratchpadTaskConfig().max_new_tokens  # 25: the longest scratchpad and its EOS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dash_model(tmp_path_factory.mktemp("tiny-random") / "model", seed=1)


def _operands(prompt: str) -> tuple[int, ...]:
    return tuple(int(x) for x in prompt[:-1].split("+"))


def test_load_task_returns_the_task_prompts():
    cfg = load_config(None, ["--data.task=scratchpad", "--data.test_size=20", "--data.seed=2"])
    stream, test = load_task(cfg.data, build_arith_tokenizer())
    # the held-out split does not depend on train_size: built here without the 100k training problems
    assert test == make_scratchpad_splits(ScratchpadTaskConfig(seed=2, test_size=20, train_size=0))[1]
    assert len(stream.examples) == ScratchpadTaskConfig().train_size
    batch = stream.next_batch(64)
    assert len({len(_operands(e.prompt)) for e in batch}) == 3  # 3, 4 and 5 terms: not the arith task's prompts
    assert all(e.answer == str(sum(_operands(e.prompt))) for e in batch)
    assert all(scratchpad_reward(e.solution, e.answer) == 1.0 for e in batch)
    assert not {e.prompt for e in batch} & {e.prompt for e in test}


def test_load_task_checks_the_longest_prompt_not_only_the_test_split():
    """Seed 0's one-prompt test split is a 3-term sum (9 tokens); the train split's 5-term prompts have 15."""
    tok = build_arith_tokenizer()
    _, test = make_scratchpad_splits(ScratchpadTaskConfig(seed=0, test_size=1, train_size=0))
    assert len(tok.encode(test[0].prompt)) == 9
    cfg = load_config(None, ["--data.task=scratchpad", "--data.test_size=1", "--data.seed=0",
                             "--data.max_prompt_tokens=14"])
    with pytest.raises(ConfigError, match=r"prompts have 15 tokens, over the limit of 14 = data\.max_prompt_tokens"):
        load_task(cfg.data, tok)


@pytest.mark.slow
def test_trainer_runs_on_the_scratchpad_task(model_dir, tmp_path, monkeypatch):
    import dash.rl.eval_sets
    import dash.rl.trainer
    from dash.rl.trainer import Trainer

    asked = []
    for module in (dash.rl.trainer, dash.rl.eval_sets):  # both look the reward up by the name in the config
        real = module.get_reward
        monkeypatch.setattr(module, "get_reward", lambda name, real=real: asked.append(name) or real(name))
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"--model.path={model_dir}", "--model.device=cpu", "--data.task=scratchpad", "--data.test_size=8",
        f"--sampling.max_new_tokens={MAX_NEW}", "--train.prompts_per_step=4", "--train.group_size=4",
        "--train.micro_batch_size=4", "--train.steps=2", "--train.lr=1e-3", "--log.eval_every=1",
        f"--log.out_dir={out}"])
    tr = Trainer(cfg, quiet=True)
    tr.setup()
    try:
        tr.train()
    finally:
        tr.close()
    assert set(asked) == {"scratchpad"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/heldout/greedy_acc" in x]
    assert len(evals) == 2 and all(0.0 <= x["eval/heldout/greedy_acc"] <= 1.0 for x in evals)
    assert sum("rollout/reward_mean" in x for x in lines) == 2
    held_out = {e.prompt for e in make_scratchpad_splits(ScratchpadTaskConfig(test_size=8, train_size=0))[1]}
    assert {e.prompt for e in tr.test_examples} == held_out


@pytest.mark.slow
def test_warmstart_cli_builds_the_scratchpad_start(tmp_path, capsys, monkeypatch):
    """`python -m dash.rl.warmstart --task scratchpad` with a 3-step budget: a loadable folder naming the task,
    evaluated with the scratchpad reward."""
    import dash.rl.warmstart as ws

    rewards = []
    real = ws.get_reward
    monkeypatch.setattr(ws, "get_reward", lambda name: rewards.append(real(name)) or rewards[-1])
    out = tmp_path / "ws"
    ws.main(["--task", "scratchpad", "--steps", "3", "--out", str(out), "--threads", "1"])
    assert "greedy test accuracy" in capsys.readouterr().out
    assert rewards == [scratchpad_reward]
    model, tok, record = ws.load_warmstart(out)
    assert record["task_name"] == "scratchpad" and record["steps"] == 3 and record["test_size"] == 500
    assert ScratchpadTaskConfig(**record["task"]) == ScratchpadTaskConfig()  # the task's settings, recorded
    assert tok.get_vocab() == build_arith_tokenizer().get_vocab()
    assert sum(p.numel() for p in model.parameters()) == record["num_params"]


def test_dash_sft_passes_the_task_to_the_warm_start(tmp_path, capsys, monkeypatch):
    """`dash sft` with data.task=scratchpad and no file runs the built-in recipe for that task (the recipe itself is
    run end to end by the test above; here only what cmd_sft hands it, so the 30 s evaluation is not paid twice)."""
    import dash.rl.warmstart

    calls = []
    monkeypatch.setattr(dash.rl.warmstart, "warmstart",
                        lambda out, **kw: calls.append((out, kw)) or {"test_accuracy": 0.0})
    out = tmp_path / "sft"
    rc = cli_main(["sft", "--data.task=scratchpad", "--data.seed=1", "--sft.steps=2", "--sft.batch_size=8",
                   "--out", str(out)])
    assert rc == 0 and "sft: greedy test accuracy 0.000" in capsys.readouterr().out
    assert len(calls) == 1 and calls[0][0] == out
    assert {k: calls[0][1][k] for k in ("task_name", "seed", "steps", "batch_size")} == {
        "task_name": "scratchpad", "seed": 1, "steps": 2, "batch_size": 8}
    assert cli_main(["sft", "--data.task=scratchpad", "--resume", str(out)]) == 2  # no checkpoints to resume
    assert "the built-in warm start (data.task=scratchpad, no sft.train_path)" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_scores_with_the_scratchpad_reward(model_dir, capsys, monkeypatch):
    """The decoder is replaced by one that writes every prompt's scratchpad: 1.0 under the scratchpad reward, 0.0
    under arith's exact-answer rule, so the printed accuracy shows which reward scored it."""
    import dash.rl.sft

    budgets = []

    def write_scratchpads(model, tokenizer, prompts, max_new_tokens):
        budgets.append(max_new_tokens)
        return [chain_solution(_operands(p), 2) for p in prompts]

    monkeypatch.setattr(dash.rl.sft, "greedy_decode", write_scratchpads)
    rc = cli_main(["smoke", f"--model.path={model_dir}", "--model.device=cpu", "--data.task=scratchpad",
                   "--data.test_size=6"])
    assert rc == 0 and budgets == [MAX_NEW]
    assert "greedy accuracy 1.000 on 6 held-out prompts" in capsys.readouterr().out


def test_warmstart_refuses_an_unknown_task_before_any_work(tmp_path):
    from dash.rl.warmstart import warmstart

    with pytest.raises(ValueError, match=r"task_name='jsonl' is not one of the built-in tasks"):
        warmstart(tmp_path / "ws", task_name="jsonl")
    assert not (tmp_path / "ws").exists()
