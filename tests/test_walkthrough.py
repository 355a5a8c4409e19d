"""docs/walkthrough.md is run as written: every command of its bash blocks, in order, in a scratch folder.

The page is the issue's "own model folder, own jsonl, own reward file, LoRA, SFT then RL, eval, export" run; this test
keeps its commands true. `dash` and `python` are replaced by this interpreter (the venv's `dash` script may not be on
PATH); nothing else in a command is changed. The end products are checked: the eval JSON holds the pass@k metrics of
the named set, and transformers loads the export with logits equal to ours.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "walkthrough.md"
STEP_TIMEOUT_S = 900  # one stage; seconds on an idle machine, minutes on a loaded shared one
LOGIT_TOL = 1e-4  # fp32 model, fp32 transformers: both sum the same products in a different order


def page_commands(text: str) -> list[str]:
    """The commands of the page's ```bash blocks, in order (one per line)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def as_argv(command: str) -> list[str]:
    head, *rest = command.split()
    if head == "dash":
        return [sys.executable, "-m", "dash", *rest]
    if head == "python":
        return [sys.executable, *rest]
    raise AssertionError(f"docs/walkthrough.md: a command must start with dash or python, got {command!r}")


def test_page_has_every_stage():
    commands = page_commands(PAGE.read_text())
    verbs = [c.split()[1] for c in commands if c.startswith("dash ")]
    assert verbs == ["sft", "train", "eval", "export"], verbs
    assert any("--model.lora.rank" in c for c in commands)
    assert "reward.py:" in (ROOT / "examples/walkthrough/config.yaml").read_text()


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for command in page_commands(PAGE.read_text()):
        proc = subprocess.run(as_argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = tmp_path / "runs" / "walkthrough"
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    for key in ("eval/test/pass@1", "eval/test/pass@4", "eval/test/greedy_acc", "eval/test/len_mean"):
        assert 0 <= metrics[key] < float("inf"), (key, metrics)
    assert (run / "rl" / "checkpoints").is_dir()

    import transformers  # seconds to import: only this slow test needs it

    from dash.model_io import load_model, load_tokenizer

    ours = load_model(run / "export").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "export", torch_dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(run / "export")("12+34=").input_ids])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits  # [1, L, V]
    assert torch.allclose(a, b, atol=LOGIT_TOL), (a - b).abs().max()
