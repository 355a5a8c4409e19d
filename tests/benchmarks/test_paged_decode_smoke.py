"""`benchmarks/paged_decode.py --dry-run` (the GPU decode-attention timing of `.ci/gpu_check.py`) on CPU under the
Triton interpreter: it runs, the kernel agrees with the fp64 reference (the script exits non-zero when it does not)
and the split heuristic split the tiny batch (the interpreter's 8 "SMs")."""

from __future__ import annotations

import pytest

from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
def test_dry_run_agrees_and_reports_every_variant(tmp_path):
    record = run_benchmark("paged_decode.py", tmp_path / "pd", "--dry-run")
    assert record["dry_run"] and record["device"] == "cpu"
    assert [r["variant"] for r in record["rows"]] == ["triton, 4 split(s)", "triton, 1 split", "gather + SDPA"]
    assert all(r["ms"] > 0 for r in record["rows"])
