"""Reward functions from user code: `file.py:function` / `package.module:function`, TRL's batch form and the
per-sample form, start-up errors that name the file and the function, and the guards (every failure scores 0, is
counted, and the run goes on)."""

from __future__ import annotations

import json
import math
import re
import textwrap

import numpy as np
import pytest

from dash.config import ConfigError, load_config
from dash.data import Example
from dash.rewards import RewardScorer, RewardSpecError, RewardSum, describe, get_answer_parser, get_reward
from dash.rewards import combine_rewards
from dash.rl.task_data import load_task

# Rows the built-in tiny model's character tokenizer can encode, with extra columns a TRL reward reads.
_ROWS = [{"prompt": f"{a:02d}+{b:02d}*{c:02d}=", "answer": str(a + b * c), "level": i % 3, "source": f"s{i}"}
         for i, (a, b, c) in enumerate([(7, 42, 13), (1, 2, 3), (10, 11, 12), (5, 5, 5), (9, 8, 7), (3, 14, 15),
                                        (2, 71, 82), (81, 82, 83), (4, 4, 4), (6, 0, 9)])]


def _write(path, source: str):
    path.write_text(textwrap.dedent(source))
    return path


def _jsonl(path, rows=_ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- end to end, TRL form


def test_trl_reward_file_drives_a_training_step_with_the_rows_columns(tmp_path):
    """A TRL function, unchanged, in a file: one call per sampling call, the rows' columns as lists aligned with the
    completions, None counted as no_reward, and its values are the rollout's rewards."""
    from dash.rl.trainer import Trainer

    log = tmp_path / "calls.jsonl"
    reward_file = _write(tmp_path / "my_rewards.py", f"""
        import json

        def level_reward(prompts, completions, level, **kwargs):
            out = [None if lv == 2 else float(len(c) % 2 == 0) for c, lv in zip(completions, level)]
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"prompts": prompts, "completions": completions, "level": level,
                                     "kwargs": sorted(kwargs), "n_ids": len(kwargs["completion_ids"]),
                                     "source": kwargs["source"], "out": out}}) + "\\n")
            return out
    """)
    data = _jsonl(tmp_path / "train.jsonl")
    cfg = load_config(None, ["--model.device=cpu", "--data.task=jsonl", f"--data.train_path={data}",
                             f"--data.test_path={data}", "--data.test_size=2",
                             f"--data.reward={reward_file}:level_reward",
                             "--sampling.max_new_tokens=4", "--train.prompts_per_step=10", "--train.group_size=2",
                             "--train.micro_batch_size=4", "--train.steps=1", "--log.eval_every=0",
                             f"--log.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == metrics["rollout/sampling_calls"] == 1  # DASH: one sampling call, so one reward call
    call = calls[0]
    S = 10 * 2  # every row once (one epoch), so the level-2 rows (3 of 10) are among them
    assert len(call["prompts"]) == len(call["completions"]) == len(call["level"]) == call["n_ids"] == S
    by_prompt = {r["prompt"]: r for r in _ROWS}
    for prompt, level, source in zip(call["prompts"], call["level"], call["source"], strict=True):
        assert by_prompt[prompt]["level"] == level and by_prompt[prompt]["source"] == source  # its own row's fields
    assert call["kwargs"] == ["answer", "completion_ids", "source"]  # every column but the prompt, as TRL passes them
    stats = trainer.sampler.reward_stats
    assert stats.no_reward == call["out"].count(None) == 3 * 2
    assert stats.failures == 0 and metrics["reward/failed_calls"] == 0
    assert metrics["rollout/reward_mean"] == pytest.approx(sum(v or 0.0 for v in call["out"]) / S)


def test_a_required_column_missing_from_the_rows_fails_at_load(tmp_path):
    reward_file = _write(tmp_path / "r.py", "def needs_solution(completions, solution, **kw):\n    return [0.0]\n")
    data = _jsonl(tmp_path / "train.jsonl")
    cfg = load_config(None, ["--data.task=jsonl", f"--data.train_path={data}", "--data.test_size=2",
                             f"--data.reward={reward_file}:needs_solution"])
    with pytest.raises(ConfigError, match=rf"data\.reward: file .*r\.py, function needs_solution: needs the dataset "
                                          rf"column 'solution' .* in .*train\.jsonl row 1 has no field 'solution'; its "
                                          rf"fields: \['answer', 'level', 'prompt', 'source'\]"):
        load_task(cfg.data, None)
    rows = [dict(r, solution=r["answer"]) for r in _ROWS]  # present in every row: accepted
    cfg = load_config(None, ["--data.task=jsonl", f"--data.train_path={_jsonl(data, rows)}", "--data.test_size=2",
                             f"--data.reward={reward_file}:needs_solution"])
    train, test = load_task(cfg.data, None)
    assert test[0].columns["solution"] == test[0].answer


def test_built_in_task_columns_for_a_trl_reward(tmp_path, monkeypatch):
    import dash.rl.task_data as task_data
    from dash.tasks.arith import ArithTaskConfig, make_example

    task = ArithTaskConfig(test_size=2)  # a few real built-in examples: the full 100k-problem split takes seconds
    examples = [make_example(task, ops) for ops in [(1, 2, 3), (4, 5, 6), (7, 8, 9)]]
    monkeypatch.setattr(task_data, "arith_task", lambda cfg: (task, examples[:2], examples[2:]))
    ok = _write(tmp_path / "ok.py", "def f(completions, solution):\n    return [1.0 for _ in completions]\n")
    load_task(load_config(None, [f"--data.reward={ok}:f"]).data, None)  # built-in examples carry answer + solution
    bad = _write(tmp_path / "bad.py", "def f(completions, level):\n    return [1.0 for _ in completions]\n")
    with pytest.raises(ConfigError, match=r"needs the dataset column 'level'.* the built-in task an example has no "
                                          r"field 'level'; its fields: \['answer', 'solution'\]"):
        load_task(load_config(None, [f"--data.reward={bad}:f"]).data, None)


# -------------------------------------------------------------------------- per-sample form, module form, sums


def test_per_sample_function_from_a_file_and_in_a_sum(tmp_path):
    path = _write(tmp_path / "per.py", "def exact(completion, answer):\n"
                                        "    return float(completion.strip() == answer)\n")
    fn = get_reward(f"{path}:exact")
    assert callable(fn) and fn.__name__ == "exact" and fn(" 7", "7") == 1.0
    both = get_reward(f"arith+{path}:exact")  # two per-sample terms: still a plain function, as for built-ins
    assert both("553<eos>", "553") == 1.0 and both("553", "553") == 1.0  # arith needs EOS; exact strips nothing
    assert load_config(None, [f"--data.reward=arith+{path}:exact"]).data.reward.endswith(":exact")


def test_module_function_form(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "myrewards"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _write(pkg / "scoring.py", """
        def length_ok(prompts, completions, max_len, **kwargs):
            return [float(len(c) <= m) for c, m in zip(completions, max_len)]
    """)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert load_config(None, ["--data.reward=myrewards.scoring:length_ok"]).data.reward == "myrewards.scoring:length_ok"
    reward = get_reward("myrewards.scoring:length_ok+format")
    assert isinstance(reward, RewardSum) and reward.batch[0].required == ("max_len",)
    scorer = RewardScorer(reward)
    rows = [{"max_len": 3}, {"max_len": 3}, {"max_len": 20}]
    got = scorer.score_batch(["p"] * 3, ["abc", "abcd", "\\boxed{1}"], ["", "", ""], rows)
    assert got == [1.0, 0.0, 2.0]  # the batch term plus the per-sample format term
    assert scorer.stats.calls == 1 + 3 and scorer.stats.failures == 0


def test_function_without_kwargs_gets_only_what_it_names():
    def strict(completions, level):  # no **kwargs: extra columns and completion_ids must not be passed
        return [float(lv) for lv in level]

    scorer = RewardScorer(strict)
    rows = [{"level": 1, "other": "x"}, {"level": 0, "other": "y"}]
    assert scorer.score_batch(["a", "b"], ["c", "d"], ["", ""], rows, [[1], [2]]) == [1.0, 0.0]
    assert scorer.stats.failures == 0


def test_score_one_sample_with_its_row():
    def trl(prompts, completions, level, **kw):
        return [float(p == "1+1=" and lv == 4) for p, lv in zip(prompts, level)]

    example = Example(prompt="1+1=", answer="2", row=3, columns={"prompt": "1+1", "answer": 2, "level": 4})
    assert RewardScorer(trl).score("2", "2", example) == 1.0


@pytest.mark.parametrize("fn,form,required", [
    (lambda completions, **kw: [], "batch", ()),
    (lambda prompts, completions: [], "batch", ()),
    (lambda completions, solution, bonus=0.5, **kw: [], "batch", ("solution",)),
    (lambda **kwargs: [], "batch", ()),
    (lambda completion, answer: 0.0, "sample", ()),
    (lambda c, a, **kw: 0.0, "sample", ()),
    (lambda completion, answer="", *, cfg=None: 0.0, "sample", ()),
], ids=["completions_kwargs", "prompts_completions", "column_and_default", "kwargs_only", "per_sample",
        "per_sample_kwargs", "per_sample_defaults"])
def test_form_is_told_from_the_signature(fn, form, required):
    loaded = describe(fn, "probe")
    assert (loaded.form, loaded.required) == (form, required)


def test_built_in_rewards_are_per_sample():
    from dash.rewards import _load_term, available_rewards

    assert {name: _load_term(name).form for name in available_rewards()} == dict.fromkeys(available_rewards(), "sample")


def test_answer_parser_and_combine_with_user_terms(tmp_path):
    path = _write(tmp_path / "r.py", "def f(completions, **kw):\n    return [0.0 for _ in completions]\n")
    assert get_answer_parser(f"{path}:f+math")("\\boxed{\\frac12}") == "\\frac12"  # the first built-in's parser
    assert get_answer_parser(f"{path}:f")("anything") == "anything"  # a user reward alone: any non-empty answer
    with pytest.raises(ValueError, match="TRL-form"):
        combine_rewards({f"{path}:f": 1.0})


# ------------------------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("source,spec,match", [
    (None, "{tmp}/missing.py:f", r"file .*missing\.py, function f: no such file"),
    ("def f(:\n", "{tmp}/r.py:f", r"file .*r\.py, function f: importing the file failed: SyntaxError: .*line 1"),
    ("import nonexistent_pkg_xyz\n", "{tmp}/r.py:f",
     r"function f: importing the file failed: ModuleNotFoundError: No module named 'nonexistent_pkg_xyz'"),
    ("raise RuntimeError('needs GPU')\n", "{tmp}/r.py:f", r"importing the file failed: RuntimeError: needs GPU"),
    ("def g(completion, answer):\n    return 0.0\n", "{tmp}/r.py:f", r"function f: no such function \(callables "
                                                                      r"there: g\)"),
    ("f = 3\n", "{tmp}/r.py:f", r"function f: is a int, not callable"),
    ("def f(x):\n    return 0.0\n", "{tmp}/r.py:f", r"function f: wrong signature f\(x\): expected TRL's "
                                                   r"fn\(prompts, completions, \*\*columns\).* or the per-sample"),
    ("def f(completions, trainer_state):\n    return []\n", "{tmp}/r.py:f", r"requires `trainer_state`"),
    (None, "no_such_pkg_xyz.rewards:f", r"module no_such_pkg_xyz\.rewards, function f: importing the module failed: "
                                        r"no such module 'no_such_pkg_xyz'"),
    (None, "{tmp}/r.py:", r"expected path/to/file\.py:function or package\.module:function"),
    (None, "not a module:f", r"'not a module' is neither a \.py file nor a package\.module name"),
    (None, "nope", r"'nope' is not one of \[.*\] \(a function of yours: path/to/file\.py:function"),
], ids=["missing_file", "syntax_error", "import_error", "raises_at_import", "no_such_function", "not_callable",
        "wrong_signature", "trainer_state", "missing_module", "no_function_name", "bad_target", "unknown_name"])
def test_startup_errors_name_the_file_the_function_and_the_problem(tmp_path, source, spec, match):
    if source is not None:
        (tmp_path / "r.py").write_text(source)
    with pytest.raises(ConfigError, match=r"^data\.reward: .*" + match) as info:
        load_config(None, [f"--data.reward=math+{spec.replace('{tmp}', str(tmp_path))}"])
    assert "\n" not in str(info.value)  # one line, even for a SyntaxError


# ------------------------------------------------------------------------------------------------- the guards


def _scored(fn, n=3, **kw):
    scorer = RewardScorer(fn, **kw)
    rewards = scorer.score_batch(["p"] * n, ["a", "bb", "ccc"][:n], ["x"] * n, [{"answer": "x"}] * n)
    return rewards, scorer.stats


def test_batch_that_raises_scores_each_sample_zero_and_counts_each():
    def boom(completions, **kw):
        raise ValueError("bad regex")

    rewards, stats = _scored(boom)
    assert rewards == [0.0] * 3 and stats.errors == 3 and stats.calls == 1
    assert "boom raised ValueError: bad regex" in stats.first_failures[0]


def test_none_nan_and_huge_values_per_sample():
    rewards, stats = _scored(lambda completions, **kw: [None, math.nan, 1e300])
    assert rewards == [0.0, 0.0, 0.0] and stats.no_reward == 1 and stats.invalid == 2 and stats.failures == 2
    rewards, stats = _scored(lambda completions, **kw: np.array([0.5, 1, 2], dtype=np.float32))
    assert rewards == [0.5, 1.0, 2.0] and stats.failures == 0  # a numpy array is a list of rewards too


@pytest.mark.parametrize("value,what", [([1.0, 1.0], "returned 2 values"), (1.0, "returned a float"),
                                        ("111", "returned a str"), (np.float64(1.0), "returned a float64")])
def test_wrong_length_or_type_is_an_error_per_sample(value, what):
    rewards, stats = _scored(lambda completions, **kw: value)
    assert rewards == [0.0] * 3 and stats.errors == 3 and f"{what}, not a list of 3 rewards" in stats.first_failures[0]


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_batch_timeout_counts_each_sample_and_the_run_goes_on(mode):
    def hangs(completions, **kw):
        import time

        time.sleep(5)
        return [1.0] * len(completions)

    rewards, stats = _scored(hangs, timeout_s=0.2, mode=mode)
    assert rewards == [0.0] * 3 and stats.timeouts == 3 and stats.calls == 1


def test_a_failing_batch_term_leaves_the_per_sample_terms():
    def boom(completions, **kw):
        raise RuntimeError("x")

    scorer = RewardScorer(RewardSum(lambda c, a: 1.0, (describe(boom, "probe"),), "one+boom"))
    assert scorer.score_batch(["p", "q"], ["a", "b"], ["", ""], [{}, {}]) == [1.0, 1.0]
    assert scorer.stats.errors == 2


def test_cli_names_a_bad_reward_file_in_one_line_before_any_work(tmp_path, capsys):
    from dash.cli import main as cli_main

    (tmp_path / "r.py").write_text("def f(x):\n    return 0.0\n")
    assert cli_main(["train", f"--data.reward={tmp_path}/r.py:f", f"--log.out_dir={tmp_path / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"data\.reward: file .*r\.py, function f: wrong signature f\(x\)", lines[0])
    assert not (tmp_path / "run").exists()
