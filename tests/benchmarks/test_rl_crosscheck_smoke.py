"""`benchmarks/rl_crosscheck.py` end to end for 2 steps: its independent arm (transformers' Qwen2 with its own
decoding and reward loop) must score the warm start exactly as dash's evaluation does before any update, or the
cross-check would compare different models or held-out sets."""

from __future__ import annotations

import pytest

from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
def test_crosscheck_runs_and_all_arms_start_from_the_same_accuracy(tmp_path):
    out = tmp_path / "cc"
    record = run_benchmark("rl_crosscheck.py", out, "--steps", "2", "--eval-every", "1")
    starts = {arm: record[f"{arm}_curve"][0] for arm in ("trainer", "independent", "supervised")}
    assert len(set(starts.values())) == 1, starts
    assert 0.1 < record["acc_start"] < 0.5  # the shipped warm start's band (0.256)
    assert all(len(record[f"{arm}_curve"]) == 3 for arm in starts)
    assert "| s / step |" in out.with_suffix(".md").read_text()
