"""The shipped warm starts (dash/assets/tiny-sft for `a+b*c`, dash/assets/tiny-add-sft for 3-digit `a+b`,
dash/assets/tiny-scratchpad-sft for the scratchpad task): each loads, matches the task's tokenizer and model config, and still reaches its recorded greedy accuracy."""

import math

import pytest

from dash.rl.sft import greedy_accuracy
from dash.tasks.arith import TINY_MODEL_CONFIG, ArithTaskConfig, arith_reward, make_splits
from dash.tasks.scratchpad import ScratchpadTaskConfig, make_scratchpad_splits, scratchpad_reward
from dash.rl.warmstart import RECORD_FILE, TINY_SFT_DIR, load_warmstart
from dash.tokenizer import build_arith_tokenizer

SUBSET = 200
# Half-width of the accepted band in binomial standard errors. The recorded accuracy p was measured on the full
# test split (500 prompts); a 200-prompt subset's accuracy has standard error sqrt(p(1-p)/200) (~3.2 points at
# p=0.3; the finite-population correction for drawing 200 of 500 would shrink it to ~2.5, so this is conservative).
# On the same torch build the result is in fact deterministic; the band absorbs the subset choice and the
# float-reduction differences of other CPUs / thread counts, which flip a few borderline argmaxes at most.
# 3 SE keeps a false alarm below 0.3% while still catching a broken load (accuracy ~0) or a wrong tokenizer.
BAND_SE = 3.0


SHIPPED = {name: TINY_SFT_DIR.parent / name for name in ("tiny-sft", "tiny-add-sft", "tiny-scratchpad-sft")}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    folder = SHIPPED[request.param]
    if not (folder / RECORD_FILE).is_file():
        pytest.fail(f"{folder} has no {RECORD_FILE}: see `python -m dash.rl.warmstart --help` to create it")
    return (*load_warmstart(folder), folder)


def test_record_is_in_the_rl_band(shipped):
    _, _, record, _ = shipped
    # The issue asks for a warm start that leaves RL room to improve: roughly 20-60% greedy.
    assert 0.2 <= record["test_accuracy"] <= 0.6, record
    assert record["test_size"] == 500


def test_tokenizer_and_config_match_the_task(shipped):
    model, tok, _, _ = shipped
    fresh = build_arith_tokenizer()
    assert tok.get_vocab() == fresh.get_vocab()
    assert (tok.pad_token_id, tok.eos_token_id) == (fresh.pad_token_id, fresh.eos_token_id)
    for text in ["12+34*56=", "553<eos>"]:
        assert tok(text)["input_ids"] == fresh(text)["input_ids"]
    hf = model.config.to_hf_dict()
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    ]:
        assert hf[key] == TINY_MODEL_CONFIG[key], key


def test_accuracy_within_noise_band(shipped):
    model, tok, record, _ = shipped
    # The test split does not depend on train_size.
    if record.get("task_name") == "scratchpad":
        task = ScratchpadTaskConfig(**{**record["task"], "train_size": 0})
        (_, test), reward = make_scratchpad_splits(task), scratchpad_reward
    else:
        task = ArithTaskConfig(**{**record["task"], "train_size": 0})
        (_, test), reward = make_splits(task), arith_reward
    p = record["test_accuracy"]
    acc = greedy_accuracy(model, tok, test[:SUBSET], task.max_new_tokens, reward)
    band = BAND_SE * math.sqrt(p * (1 - p) / SUBSET)
    assert abs(acc - p) <= band, f"subset accuracy {acc:.3f} vs recorded {p:.3f} (band +-{band:.3f})"


def test_transformers_reads_the_shipped_folder(shipped):
    """The folder is a plain HF checkpoint: transformers' Qwen2 gives the same logits as our model."""
    import torch
    from transformers import Qwen2ForCausalLM

    model, tok, _, folder = shipped
    hf = Qwen2ForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(tok(["12+34*56=1916", "07+42*13=553<eos>"])["input_ids"])  # [2, 13]: same length, no padding
    with torch.no_grad():
        ours, theirs = model.forward(ids), hf(input_ids=ids).logits  # [2, 12, V] each
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_warmstart_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    """`python -m dash.rl.warmstart` end to end with a 2-step budget (the real run is minutes)."""
    from dash.rl.warmstart import main

    out = tmp_path / "ws"
    main(["--out", str(out), "--steps", "2", "--seed", "1"])
    assert "greedy test accuracy" in capsys.readouterr().out
    model, tok, record = load_warmstart(out)
    assert record["steps"] == 2 and record["seed"] == 1 and record["test_size"] == 500
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert len(tok) == TINY_MODEL_CONFIG["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == record["num_params"]


@pytest.mark.slow
def test_warmstart_cli_takes_the_task_shape_and_schedule(tmp_path):
    """The options that build tiny-add-sft reach the task split and the SFT schedule (recorded)."""
    from dash.rl.warmstart import main

    out = tmp_path / "ws"
    main(["--out", str(out), "--steps", "2", "--form", "a+b", "--digits", "3", "--schedule", "constant"])
    _, _, record = load_warmstart(out)
    assert record["task"]["form"] == "a+b" and record["task"]["digits"] == 3 and record["schedule"] == "constant"


def test_learning_demo_config_points_at_its_warm_start():
    from pathlib import Path

    from dash.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/tiny-add.yaml"), [])
    _, _, record = load_warmstart(SHIPPED["tiny-add-sft"])
    assert cfg.model.path == "builtin:tiny-add-sft"
    assert (cfg.data.arith_form, cfg.data.arith_digits, cfg.data.seed) == (
        record["task"]["form"], record["task"]["digits"], record["task"]["seed"])
