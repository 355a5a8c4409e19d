"""`benchmarks/paged_attention.py` end to end (smallest shapes, two calls each): every mode runs, the C++ kernel agrees
with that mode's SDPA reference (the script exits non-zero when it does not), and the table lists every row."""

from __future__ import annotations

import pytest

from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
def test_every_mode_runs_and_agrees_with_its_reference(tmp_path):
    out = tmp_path / "pa"
    record = run_benchmark("paged_attention.py", out, "--batches", "16", "--head-dims", "32", "--threads", "1",
                           "--repeats", "2")
    assert [(r["mode"], r["batch"]) for r in record["rows"]] == [("decode", 16), ("prefill", 16), ("prefix", 16),
                                                                 ("long", 1), ("long-equal", 1)]
    assert all(r["max_abs_diff"] <= 1e-5 and r["cpp_ms_min"] > 0 and r["ref_ms_min"] > 0 for r in record["rows"])
    table = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| 1 | ") for line in table) == 5
