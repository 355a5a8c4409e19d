"""`benchmarks/rl_crosscheck.py` end to end for 2 steps: its independent arm (transformers' Qwen2 with its own
decoding and reward loop) must score the warm start exactly as dash's evaluation does before any update, or the
cross-check would compare different models or held-out sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_crosscheck_runs_and_all_arms_start_from_the_same_accuracy(tmp_path):
    out = tmp_path / "cc"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/rl_crosscheck.py"), "--steps", "2", "--eval-every", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    record = json.loads(out.with_suffix(".json").read_text())
    starts = {arm: record[f"{arm}_curve"][0] for arm in ("trainer", "independent", "supervised")}
    assert len(set(starts.values())) == 1, starts
    assert 0.1 < record["acc_start"] < 0.5  # the shipped warm start's band (0.256)
    assert all(len(record[f"{arm}_curve"]) == 3 for arm in starts)
    assert "| s / step |" in out.with_suffix(".md").read_text()
