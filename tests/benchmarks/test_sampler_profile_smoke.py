"""`benchmarks/sampler_profile.py` end to end (one round): every stage must be seen (a renamed engine function or
profiler event would otherwise drop out of the profile silently) and the stages must fit inside the profiled call
they split."""

from __future__ import annotations

import pytest

from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
def test_profile_times_every_stage_within_the_call(tmp_path):
    out = tmp_path / "prof"
    record = run_benchmark("sampler_profile.py", out, "--threads", "1", "--repeats", "1")
    stages = ("linear", "attention", "sample", "schedule", "postprocess")
    assert all(record[f"{s}_ms"] > 0 for s in stages), record
    assert record["other_ms"] >= 0 and sum(record[f"{s}_ms"] for s in stages) <= record["profiled_call_ms"]
    # From the unrounded times: the rounded ones may differ in the last printed digit.
    assert abs(record["hf_over_linear"] - record["hf_call_ms"] / record["linear_ms"]) <= 0.011
    assert "| linear |" in out.with_suffix(".md").read_text()
