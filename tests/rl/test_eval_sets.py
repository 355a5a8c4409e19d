"""Evaluation as papers do it (dash/rl/evaluate.py, eval_sets.py, eval_run.py): the pass@k estimator, metrics per named
set, eval's own sampling settings, `dash eval` on an HF folder / a run / a LoRA checkpoint, and bad input."""

import itertools
import json
import re
from types import SimpleNamespace

import pytest
import torch

from dash.cli import main as cli_main
from dash.config import ConfigError, EvalConfig, config_to_dict, load_config
from dash.rewards import RewardScorer, register_reward
from dash.rl.eval_sets import check_eval_sets, load_eval_sets
from dash.rl.evaluate import evaluate_set, evaluate_sets, length_stats, pass_at_k
from dash.rl.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer
from tests.tiny_models import save_tiny_dash_model

PROMPTS = ["12+34*56=", "3+4*5=", "7+8*9=", "10+2*3=", "5+5*5="]


def _even_length(completion: str, answer: str) -> float:
    """A reward a random model earns about half the time: pass@k then moves with k."""
    return float(len(completion) % 2 == 0)


register_reward("test_eval_even_length", _even_length)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dash_model(tmp_path_factory.mktemp("eval-tiny") / "model", seed=1)


@pytest.fixture
def set_file(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps({"question": p, "gold": "0"}) + "\n" for p in PROMPTS))
    return path


def _cfg(model_dir, *extra):
    return load_config(None, [f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=6",
                              "--data.reward=test_eval_even_length", "--sampling.max_new_tokens=8", *extra])


def _two_sets(set_file):
    return ["--eval.sets.heldout.path=null", f"--eval.sets.extra.path={set_file}",
            "--eval.sets.extra.prompt_field=question", "--eval.sets.extra.answer_field=gold"]


# -- the estimator -----------------------------------------------------------------------------------------------
def test_pass_at_k_equals_brute_force_over_subsets():
    """pass@k is the chance that k of the n samples, drawn without replacement, hold a correct one: count the
    k-subsets of n samples (the first c correct) that do, exactly, for every n <= 8."""
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(i < c for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(n, c, k)


def test_length_stats_by_hand():
    # sorted [1, 2, 3, 4, 10]: p90 at rank 0.9 * 4 = 3.6, between 4 and 10 -> 4 + 0.6 * 6
    stats = length_stats([3, 1, 10, 2, 4], [False, False, True, False, True])
    assert stats == pytest.approx({"len_mean": 4.0, "len_median": 3.0, "len_p90": 7.6, "truncated_frac": 0.4})


# -- evaluate_set on scripted completions: every metric checked against its definition ---------------------------
class _ScriptedSampler:
    """Returns fixed completions: `sampled[prompt]` (n of them) or, at temperature 0, `greedy[prompt]`."""

    def __init__(self, sampled, greedy):
        self.sampled, self.greedy, self.calls = sampled, greedy, []
        self.cfg = SimpleNamespace(temperature=0.7, top_k=0)
        self.reward = RewardScorer(lambda completion, answer: float(completion == answer))

    def generate(self, prompts, n, seeds, temperature=None):
        self.calls.append((n, temperature))
        table = self.greedy if temperature == 0 else self.sampled
        return [SimpleNamespace(completions=[SimpleNamespace(text=t, token_ids=[0] * len(t), finish_reason=f)
                                             for t, f in table[p][:n]]) for p in prompts]


def test_evaluate_set_metrics_follow_their_definitions():
    examples = [SimpleNamespace(prompt="p", answer="ab", columns=None), SimpleNamespace(prompt="q", answer="c",
                                                                                         columns=None)]
    sampled = {"p": [("ab", "stop"), ("x", "stop"), ("ab", "stop"), ("xyzw", "length")],  # c = 2
               "q": [("d", "stop"), ("ee", "stop"), ("fff", "length"), ("c", "stop")]}  # c = 1
    greedy = {"p": [("ab", "stop")], "q": [("no", "stop")]}
    es = SimpleNamespace(name="s", examples=examples, sampler=_ScriptedSampler(sampled, greedy))
    metrics, shown = evaluate_set(es, n=4, ks=[1, 2, 4], greedy=True, run_seed=0, samples_shown=1)
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert metrics["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert metrics["pass@4"] == 1.0 and metrics["greedy_acc"] == 0.5 and metrics["prompts"] == 2
    assert metrics["reward_mean"] == pytest.approx(3 / 8)
    lengths = [2, 1, 2, 4, 1, 2, 3, 1]
    assert metrics["len_mean"] == pytest.approx(sum(lengths) / 8) and metrics["truncated_frac"] == 0.25
    assert es.sampler.calls == [(4, None), (1, 0.0)]  # n samples at eval's settings, then one greedy decode
    assert shown == [{"set": "s", "prompt": "p", "completion": "ab", "answer": "ab", "reward": 1.0}]


# -- real sampling on the tiny model -----------------------------------------------------------------------------
def _model(model_dir):
    from dash.model_io import load_model, load_tokenizer

    return load_model(model_dir).eval(), load_tokenizer(model_dir)


@pytest.mark.slow
def test_two_sets_with_n_samples_each_get_their_metrics(model_dir, set_file):
    cfg = _cfg(model_dir, *_two_sets(set_file), "--eval.n=4", "--eval.k=1,2,4", "--eval.max_new_tokens=5")
    model, tok = _model(model_dir)
    sets = load_eval_sets(cfg, tok, model)
    assert list(sets) == ["heldout", "extra"] and len(sets["heldout"].examples) == 6
    assert [e.prompt for e in sets["extra"].examples] == PROMPTS
    with torch.no_grad():
        metrics, shown = evaluate_sets(sets, cfg.eval, run_seed=0)
    for name, prompts in (("heldout", 6), ("extra", len(PROMPTS))):
        m = {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"eval/{name}/")}
        assert set(m) == {"pass@1", "pass@2", "pass@4", "greedy_acc", "reward_mean", "len_mean", "len_median",
                          "len_p90", "truncated_frac", "prompts"}
        assert m["prompts"] == prompts and 0 <= m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1
        assert 1 <= m["len_median"] <= m["len_p90"] <= 5
    assert {s["set"] for s in shown} == {"heldout", "extra"}
    again, _ = evaluate_sets(sets, cfg.eval, run_seed=0)  # seeded per prompt: the same weights, the same numbers
    assert {k: v for k, v in again.items() if k != "time/eval_s"} == {k: v for k, v in metrics.items()
                                                                        if k != "time/eval_s"}


@pytest.mark.slow
def test_eval_samples_with_its_own_settings_not_the_training_ones(model_dir):
    """Training samples at temperature 1 with 8 new tokens; eval at temperature 0 with 2: the completions are the
    engine's greedy 2-token ones, and the length statistics show the cap."""
    from dash.engine import SamplingParams, generate

    cfg = _cfg(model_dir, "--sampling.temperature=1.0", "--eval.temperature=0", "--eval.max_new_tokens=2",
               "--eval.greedy=false")
    model, tok = _model(model_dir)
    sets = load_eval_sets(cfg, tok, model)
    with torch.no_grad():
        metrics, shown = evaluate_sets(sets, cfg.eval, run_seed=0, samples_shown=6)
        expected = generate(model, tok, [e.prompt for e in sets["heldout"].examples],
                            params=SamplingParams(temperature=0.0, max_new_tokens=2, seed=0))
    assert [s["completion"] for s in shown] == [r.completions[0].text for r in expected]
    assert metrics["eval/heldout/len_p90"] <= 2 and metrics["eval/heldout/len_mean"] <= 2
    # the untrained model almost never ends with EOS within 2 tokens: most answers are cut at eval's limit
    assert metrics["eval/heldout/truncated_frac"] == sum(r.completions[0].finish_reason == "length"
                                                         for r in expected) / len(expected) > 0
    assert "eval/heldout/greedy_acc" not in metrics


@pytest.mark.slow
def test_trainer_scheduled_eval_uses_the_eval_section(model_dir, set_file, tmp_path):
    from dash.rl.trainer import Trainer

    cfg = _cfg(model_dir, *_two_sets(set_file), "--eval.n=2", "--eval.k=1,2", "--eval.max_new_tokens=3",
               "--train.prompts_per_step=4", "--train.group_size=4", "--train.micro_batch_size=8",
               "--train.steps=1", "--log.eval_every=1", f"--log.out_dir={tmp_path / 'run'}")
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    ev = [h for h in trainer.history if "time/eval_s" in h][-1]
    for name in ("heldout", "extra"):
        assert {f"eval/{name}/pass@1", f"eval/{name}/pass@2", f"eval/{name}/greedy_acc"} <= set(ev)
        assert ev[f"eval/{name}/len_p90"] <= 3  # eval's limit, not sampling.max_new_tokens=8
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/extra/pass@2" in r for r in logged)


# -- dash eval ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dash_eval_on_an_hf_folder_writes_results_and_a_table(model_dir, set_file, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli_main(["eval", str(model_dir), "--model.device=cpu", "--data.test_size=4",
                     "--data.reward=test_eval_even_length", "--sampling.max_new_tokens=4", *_two_sets(set_file),
                     "--eval.n=3", "--eval.k=1,3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^set\s+prompts\s+pass@1\s+pass@3\s+greedy", text, re.M) and f"results in {out}" in text
    record = json.loads(out.read_text())
    assert record["model_folder"] == str(model_dir) and record["checkpoint"] is None
    assert record["settings"] == {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 4, "n": 3,
                                  "k": [1, 3], "greedy": True, "seed": 0}
    assert record["sets"]["extra"] == {"source": str(set_file), "reward": "test_eval_even_length", "prompts": 5}
    for name in ("heldout", "extra"):
        assert re.search(rf"^{name}\s+\d", text, re.M) and f"eval/{name}/pass@3" in record["metrics"]
    # --eval.select runs one of the sets
    assert cli_main(["eval", str(model_dir), "--model.device=cpu", "--sampling.max_new_tokens=4",
                     "--data.reward=test_eval_even_length", *_two_sets(set_file), "--eval.select=extra",
                     "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["sets"]) == {"extra"}


def _run_eval(source, model_dir, out, *extra):
    from dash.eval_run import run_eval

    cfg = _cfg(model_dir, "--data.test_size=4", "--eval.n=2", "--eval.k=1,2", "--sampling.max_new_tokens=4", *extra)
    return run_eval(cfg, source=str(source) if source else None, out=out)


@pytest.mark.slow
def test_dash_eval_on_a_checkpoint_reads_its_weights(model_dir, tmp_path, capsys):
    from dash.rl.checkpoint import save_checkpoint

    trained = build_tiny_model(seed=2)  # the checkpoint's weights differ from model.path's (seed 1)
    cfg = _cfg(model_dir)
    save_checkpoint(tmp_path / "run", 3, trained, build_arith_tokenizer(), {"config": config_to_dict(cfg)})
    hf = save_tiny_dash_model(tmp_path / "seed2", seed=2)
    assert cli_main(["eval", str(tmp_path / "run"), "--model.device=cpu", f"--model.path={model_dir}",
                     "--data.test_size=4", "--sampling.max_new_tokens=4", "--eval.n=2", "--eval.k=1,2",
                     "--data.reward=test_eval_even_length", "--out", str(tmp_path / "ck.json")]) == 0
    from_ckpt = json.loads((tmp_path / "ck.json").read_text())
    assert from_ckpt["checkpoint"].endswith("step-3")
    from_hf = _run_eval(hf, model_dir, tmp_path / "hf.json")
    from_base = _run_eval(None, model_dir, tmp_path / "base.json")
    assert from_ckpt["samples"] == from_hf["samples"] != from_base["samples"]
    drop = "time/eval_s"
    assert {k: v for k, v in from_ckpt["metrics"].items() if k != drop} == {
        k: v for k, v in from_hf["metrics"].items() if k != drop}


@pytest.mark.slow
def test_dash_eval_of_a_lora_checkpoint_applies_its_adapters(model_dir, tmp_path):
    from dash.lora import apply_lora, lora_modules
    from dash.model_io import load_model
    from dash.rl.checkpoint import save_checkpoint

    cfg = _cfg(model_dir, "--model.lora.enabled=true", "--model.lora.rank=2")
    model = load_model(model_dir).eval()
    apply_lora(model, cfg.model.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B is zero at init: make the adapters change the outputs
            m.lora_B.weight.normal_(0, 0.5)
    save_checkpoint(tmp_path / "run", 1, model, build_arith_tokenizer(), {"config": config_to_dict(cfg)},
                    base_model=str(model_dir))
    from_ckpt = _run_eval(tmp_path / "run", model_dir, tmp_path / "lora.json")
    cfg2 = _cfg(model_dir, "--data.test_size=4", "--eval.n=2", "--eval.k=1,2", "--sampling.max_new_tokens=4")
    with torch.no_grad():
        _, shown = evaluate_sets(load_eval_sets(cfg2, build_arith_tokenizer(), model), cfg2.eval, 0)
    assert from_ckpt["samples"] == shown
    assert from_ckpt["samples"] != _run_eval(None, model_dir, tmp_path / "base.json")["samples"]  # base alone


# -- bad input: one clear error, before any work -----------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (["--eval.n=2", "--eval.k=1,4"], r"eval\.k=\[1, 4\]: pass@4 needs at least 4 samples .* eval\.n=2"),
    (["--eval.select=math500"], r"eval\.select: no eval set named 'math500' \(known: heldout\)"),
    (["--eval.sets.gsm8k.path=a.jsonl", "--eval.select=gsm8k,math"], r"no eval set named 'math' \(known: gsm8k\)"),
    (["--eval.temperature=0", "--eval.n=4"], r"decodes greedily: the eval\.n=4 samples .* identical"),
    (["--eval.k=0"], r"eval\.k must be distinct integers >= 1"),
    (["--eval.k=1,1"], r"eval\.k must be distinct integers >= 1"),
    (["--eval.top_p=0"], r"eval\.top_p must be in \(0, 1\]"),
    (["--eval.sets.x.pth=a.jsonl"], r"unknown config key eval\.sets\.x\.pth"),
    (["--eval.sets.x.limit=-1"], r"eval\.sets\.x\.limit must be >= 0"),
    (["--eval.sets.x.reward=nope"], r"eval\.sets\.x\.reward: "),
    (["--eval.sets=[1]"], r"eval\.sets must be a mapping"),
    (["--eval.sets.a/b.path=x"], r"set name 'a/b' must be letters"),
    (["--log.eval_pass_k=4"], r"log\.eval_pass_k was replaced by the eval section: use --eval\.n=4 --eval\.k=1,4"),
], ids=["n_below_k", "unknown_set", "unknown_selected", "greedy_n", "k_zero", "k_twice", "top_p", "unknown_key",
        "limit", "reward", "sets_not_mapping", "set_name", "eval_pass_k_moved"])
def test_bad_eval_config_is_a_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_eval_config_defaults_are_the_papers():
    e = EvalConfig()
    assert (e.temperature, e.top_p, e.n, e.k, e.greedy) == (0.7, 0.95, 1, [1], True)
    assert load_config(None, ["--eval.k=[4, 1]", "--eval.n=4"]).eval.k == [1, 4]


def test_eval_sets_from_overrides_yaml_text_and_a_saved_config(tmp_path):
    import yaml

    cfg = load_config(None, ["--eval.sets.gsm8k={path: a.jsonl, reward: gsm8k, limit: 3}",
                             "--eval.sets.heldout.path=null", "--eval.select=heldout,gsm8k"])
    assert (cfg.eval.sets["gsm8k"].path, cfg.eval.sets["gsm8k"].reward, cfg.eval.sets["gsm8k"].limit) == (
        "a.jsonl", "gsm8k", 3)
    assert cfg.eval.sets["heldout"].path is None and cfg.eval.selected_names() == ["heldout", "gsm8k"]
    saved = tmp_path / "saved.yaml"  # a checkpoint's config (config_to_dict) reads back to the same config
    saved.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(saved) == cfg


def test_missing_set_file_names_the_set_key_and_path(tmp_path):
    cfg = load_config(None, [f"--eval.sets.gsm8k.path={tmp_path}/nope.jsonl"])
    with pytest.raises(ConfigError, match=rf"eval\.sets\.gsm8k\.path: no such file {tmp_path}/nope\.jsonl "
                                          r"\(eval set 'gsm8k'\)"):
        check_eval_sets(cfg)
    cfg = load_config(None, [f"--eval.sets.shards.path={tmp_path}/*.parquet"])
    with pytest.raises(ConfigError, match=r"eval\.sets\.shards\.path: the pattern .* matches no file"):
        check_eval_sets(cfg)


def test_eval_answers_must_fit_the_models_context():
    cfg = load_config(None, ["--eval.max_new_tokens=64"])
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=64 \(eval's answer limit\) must be below the "
                                          r"model's context \(64"):
        check_eval_sets(cfg, max_context=64)


def test_longer_eval_answers_with_a_fixed_kv_pool_are_refused_for_the_heldout_set(set_file):
    pool = ["--sampling.num_pages=4", "--sampling.max_new_tokens=8", "--eval.max_new_tokens=16"]
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=16 is above sampling\.max_new_tokens=8 with a fixed "
                                          r"KV pool \(sampling\.num_pages=4\)"):
        check_eval_sets(load_config(None, pool))
    check_eval_sets(load_config(None, [*pool, f"--eval.sets.extra.path={set_file}"]))  # a file's rows are sized anew


@pytest.mark.parametrize("argv,match", [
    (["eval", "--eval.sets.gsm8k.path={tmp}/gsm8k.jsonl"], r"eval\.sets\.gsm8k\.path: no such file .*gsm8k\.jsonl"),
    (["eval", "{tmp}/no-run"], r"no-run: no such run or checkpoint folder"),
    (["eval", "--eval.n=1", "--eval.k=2"], r"pass@2 needs at least 2 samples"),
    (["eval", "--eval.select=mmlu"], r"no eval set named 'mmlu'"),
    (["eval", "--data.task=jsonl", "--data.train_path={tmp}/train.jsonl"],
     r"data\.train_path: no such file .*train\.jsonl \(the held-out eval set\)"),
], ids=["missing_file", "missing_source", "n_below_k", "unknown_set", "missing_heldout_data"])
def test_dash_eval_bad_input_is_one_line_before_loading(tmp_path, capsys, monkeypatch, argv, match):
    import dash.model_io

    monkeypatch.chdir(tmp_path)  # log.out_dir (runs/tiny) is relative: nothing may appear here
    monkeypatch.setattr(dash.model_io, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    assert cli_main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--model.device=cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), lines
    assert list(tmp_path.iterdir()) == []
