"""`dash sft` on the user's data (dash/rl/sft_train.py, sft_data.py, sft.py): a tiny HF Qwen2 folder and a jsonl /
parquet file made here. The loss falls; it equals a naive full-logits reference over the solution tokens only (the
prompt carries none); micro-batching makes the same update; a resumed run ends bitwise where an uninterrupted one
does (full and LoRA); the written folder is what `dash train --model.path` and transformers load; bad input is a
clear error naming the file, row and field before any run folder is made."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dash.cli import main as cli_main
from dash.config import ConfigError, load_config
from dash.model_io import load_model, load_tokenizer
from dash.rl.checkpoint import MODEL_DIR
from dash.rl.sft import sft_loss
from dash.rl.sft_data import load_sft_examples, pack_sft_ids, tokenize_pairs
from dash.rl.sft_train import FINAL_DIR, RUN_SUBDIR, SFTRun, run_sft_on_file
from dash.runtime import resolve_model_path
from dash.tokenizer import build_char_tokenizer
from tests.tiny_models import random_hf_model

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+=?: "
QWEN2 = {"vocab_size": 3 + len(ALPHABET), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LORA = ["--model.lora.enabled=true", "--model.lora.rank=4", "--model.lora.alpha=8", "--model.lora.dropout=0.1"]


def _rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"what is {a}+{a + 3}?", "solution": f"it is {2 * a + 3}", "answer": str(2 * a + 3)}
            for a in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random HF Qwen2ForCausalLM (save_pretrained) with a character tokenizer over ALPHABET."""
    folder = tmp_path_factory.mktemp("qwen2")
    random_hf_model("Qwen2ForCausalLM", QWEN2, seed=0).save_pretrained(folder)
    build_char_tokenizer(ALPHABET, model_max_length=QWEN2["max_position_embeddings"]).save_pretrained(folder)
    return folder


@pytest.fixture()
def data(tmp_path):
    return _jsonl(tmp_path / "sft.jsonl", _rows())


def _cfg(model_dir, data, out, *extra):
    return load_config(None, [f"--model.path={model_dir}", "--model.device=cpu", f"--sft.train_path={data}",
                              "--sft.batch_size=6", "--sft.lr=3e-3", f"--log.out_dir={out}", *extra])


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_loss_decreases_and_the_folder_loads_as_model_path(model_dir, data, tmp_path):
    run = SFTRun(_cfg(model_dir, data, tmp_path, "--sft.steps=30", "--sft.lr_schedule=cosine",
                      "--sft.warmup_steps=3"), quiet=True)
    run.setup()
    run.train()
    out = run.write_model()
    trained = _weights(run.model)
    run.close()
    losses = [h["train/loss"] for h in run.history]
    # Random weights start near ln(V) ~ 3.8 nats; 30 steps on 24 rows must cut the loss clearly.
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    lrs = [h["train/lr"] for h in run.history]
    assert lrs[0] == pytest.approx(3e-3 / 3) and lrs[2] == pytest.approx(3e-3) and lrs[-1] < lrs[3]  # warm-up, cosine
    assert out == tmp_path / RUN_SUBDIR / FINAL_DIR
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    cfg = load_config(None, [f"--model.path={out}"])  # what `dash train --model.path` checks and loads
    loaded = load_model(resolve_model_path(cfg.model.path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    assert load_tokenizer(out).get_vocab() == load_tokenizer(model_dir).get_vocab()
    from transformers import Qwen2ForCausalLM

    ids = torch.tensor([tokenize_pairs(load_tokenizer(out), ["what is 1+4?"], ["it is 5"])[0][0]])  # [1, L]
    with torch.no_grad():
        theirs = Qwen2ForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits  # [1, L, V]
        assert (theirs - loaded.forward(ids)).abs().max() < 1e-4  # fp32 both; as the shipped folder's parity test


def _naive_loss(model, pairs):
    """Full [L, V] logits per sequence, log-softmax, mean over the solution tokens only (the specification)."""
    total, n = 0.0, 0
    for p, s in pairs:
        ids = torch.tensor([p + s])  # [1, L]
        logp = torch.log_softmax(model.forward(ids)[0].double(), dim=-1)  # [L, V]
        for j, tok in enumerate(s):  # solution token j sits at position len(p) + j, predicted from the one before
            total = total - logp[len(p) + j - 1, tok]
            n += 1
    return total / n


def test_loss_is_the_masked_mean_over_solution_tokens(model_dir):
    """Our packed, fused-kernel loss and its gradients against the naive full-logits loss of the same batch. The
    tolerance is the reference's own fp32 error (fp32 naive vs fp64 naive) x 2 + 1e-6, as style.md section 9.3."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).train()
    pairs = tokenize_pairs(tok, ["what is 1+2?", "a?", "what is 30+33?"], ["it is 3", "b", "it is 63"])
    batch = pack_sft_ids(pairs)
    assert int(batch.loss_mask.sum()) == sum(len(s) for _, s in pairs)  # EOS appended to each solution
    assert batch.targets[batch.loss_mask].tolist() == [t for _, s in pairs for t in s]

    def grads(fn, m):
        m.zero_grad()
        loss = fn(m)
        loss.backward()
        return loss.detach().double(), {n: p.grad.double().clone() for n, p in m.named_parameters()}

    ours, g_ours = grads(lambda m: sft_loss(m, batch)[0], model)
    ref32, g32 = grads(lambda m: _naive_loss(m, pairs), model)
    model64 = copy.deepcopy(model).double()
    ref64, g64 = grads(lambda m: _naive_loss(m, pairs), model64)
    assert abs(ours - ref64) <= 2 * abs(ref32 - ref64) + 1e-6, (ours, ref32, ref64)
    for name in g64:
        err, ref_err = (g_ours[name] - g64[name]).abs().max(), (g32[name] - g64[name]).abs().max()
        assert err <= 2 * ref_err + 1e-6, (name, err, ref_err)
    # Prompt tokens carry no loss: the same tokens with all but the first counted (a loss over the prompt's
    # next-token targets too) give a clearly different value.
    everything = [([p[0]], p[1:] + s) for p, s in pairs]
    assert abs(sft_loss(model, pack_sft_ids(everything))[0].item() - ours.item()) > 1e-3


@pytest.mark.slow
def test_micro_batches_make_the_same_update(model_dir, data, tmp_path):
    """sft.token_budget splits a step (the same update up to summation order); train.gradient_checkpointing
    recomputes the layers (bitwise the same update)."""
    runs = {}
    for name, extra in ((0, []), (40, ["--sft.token_budget=40"]), ("gc", ["--train.gradient_checkpointing=true"])):
        run = SFTRun(_cfg(model_dir, data, tmp_path / str(name), "--sft.steps=2", *extra), quiet=True)
        run.setup()
        assert run.model.gradient_checkpointing is (name == "gc")
        metrics = [run.train_step() for _ in range(2)]
        runs[name] = (metrics, _weights(run.model))
        run.close()
    assert all(torch.equal(runs[0][1][k], runs["gc"][1][k]) for k in runs[0][1])
    assert runs[40][0][0]["train/micro_batches"] > 1 and runs[0][0][0]["train/micro_batches"] == 1
    for a, b in zip(runs[0][0], runs[40][0]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)  # float summation order only
    w0, w40 = runs[0][1], runs[40][1]
    assert max((w0[k] - w40[k]).abs().max().item() for k in w0) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_bitwise(model_dir, data, tmp_path, lora):
    extra = ["--sft.steps=4", "--sft.lr_schedule=cosine", *(LORA if lora else [])]
    straight = SFTRun(_cfg(model_dir, data, tmp_path / "a", *extra), quiet=True)
    straight.setup()
    straight.train()
    expected = _weights(straight.model)
    straight.close()

    cfg = _cfg(model_dir, data, tmp_path / "b", *extra)
    first = SFTRun(cfg, quiet=True)
    first.setup()
    first.train_step()
    first.train_step()
    ckpt = first.save_checkpoint()
    first.close()
    assert (ckpt / "adapter").is_dir() == lora and (ckpt / MODEL_DIR).is_dir() != lora
    second = SFTRun(cfg, quiet=True)
    second.setup(resume=str(tmp_path / "b" / RUN_SUBDIR))
    assert second.step == 2
    second.train()
    out = second.write_model()
    got = _weights(second.model)
    second.close()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    merged = load_model(out).state_dict()  # LoRA: merged into the base, no lora_ tensor
    assert not any("lora_" in k for k in merged)
    assert len(merged) == len(load_model(model_dir).state_dict())


def test_parquet_input_with_own_fields_and_template(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": r["prompt"], "response": r["solution"]} for r in _rows(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = _cfg(model_dir, tmp_path / "d.parquet", tmp_path, "--sft.prompt_field=question",
               "--sft.solution_field=response", "--data.prompt_template=q: {prompt} a:")
    examples = load_sft_examples(cfg, load_tokenizer(model_dir), 64)
    assert [e.prompt for e in examples] == [f"q: {r['question']} a:" for r in rows]
    assert [e.answer for e in examples] == [r["response"] for r in rows]
    tok = load_tokenizer(model_dir)
    assert examples[0].columns["solution_ids"][-1] == tok.eos_token_id


def test_chat_template_as_in_rl(model_dir, data, tmp_path):
    tok = load_tokenizer(model_dir)
    cfg = _cfg(model_dir, data, tmp_path, "--data.chat_template=always")
    with pytest.raises(ConfigError, match="data.chat_template=always, but the model's tokenizer has no chat template"):
        load_sft_examples(cfg, tok, 64)
    tok.chat_template = ("{% for m in messages %}u: {{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %} a:{% endif %}")
    examples = load_sft_examples(cfg, tok, 64)
    assert examples[0].prompt == "u: what is 0+3? a:"


@pytest.mark.parametrize("case,match", [
    ("missing_file", r"sft.train_path: no such file .*nope.jsonl"),
    ("no_solution", r"sft.jsonl line 3 has no solution field \(sft.solution_field='solution'\)"),
    ("empty_solution", r"sft.jsonl line 2 has an empty solution \(sft.solution_field='solution'\)"),
    ("empty_file", r"sft.jsonl has no usable rows \(0 read"),
    ("unknown_field", r"no row of .*sft.jsonl has the field of sft.solution_field='answer_text' \(the first row has: "
                      r"prompt, solution, answer\)"),
    ("unknown_prompt", r"no row of .*sft.jsonl has the field of sft.prompt_field='question'"),
])
def test_bad_input_fails_before_any_work(model_dir, tmp_path, case, match):
    rows = _rows(4)
    extra = []
    if case == "no_solution":
        del rows[2]["solution"]
    if case == "empty_solution":
        rows[1]["solution"] = " "
    if case == "empty_file":
        rows = []
    if case == "unknown_field":
        extra = ["--sft.solution_field=answer_text"]
    if case == "unknown_prompt":
        extra = ["--sft.prompt_field=question"]
    path = tmp_path / "nope.jsonl" if case == "missing_file" else _jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ConfigError, match=match):
        run_sft_on_file(_cfg(model_dir, path, tmp_path / "run", *extra), quiet=True)
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed


@pytest.mark.slow
def test_cli_runs_resumes_and_refuses(model_dir, data, tmp_path, capsys):
    args = ["sft", f"--model.path={model_dir}", "--model.device=cpu", f"--sft.train_path={data}", "--sft.steps=2",
            "--sft.batch_size=4", f"--log.out_dir={tmp_path}"]
    assert cli_main(args) == 0
    out = tmp_path / RUN_SUBDIR / FINAL_DIR
    assert f"--model.path={out}" in capsys.readouterr().out
    assert cli_main(args) == 2  # the run folder holds a run
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main([*args, "--resume", str(tmp_path / RUN_SUBDIR)]) == 0  # finished: re-exports
    assert cli_main([*args, "--overwrite", "--sft.steps=3"]) == 0
    assert json.loads((tmp_path / RUN_SUBDIR / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert cli_main([*args[:4], "--sft.train_path=missing.jsonl", f"--log.out_dir={tmp_path / 'x'}"]) == 2
    assert "sft.train_path: no such file missing.jsonl" in capsys.readouterr().err
    # `dash train` takes the written folder as its model (set-up checks and loading, no training step here)
    from dash.rl.trainer import Trainer

    rl = Trainer(load_config(None, [f"--model.path={out}", "--model.device=cpu", "--data.task=jsonl",
                                    f"--data.train_path={data}", "--data.test_size=4", "--sampling.max_new_tokens=8",
                                    "--data.reward=math", f"--log.out_dir={tmp_path / 'rl'}"]), quiet=True)
    try:
        rl.setup()
        assert rl.model.config.vocab_size == QWEN2["vocab_size"]
    finally:
        rl.close()
