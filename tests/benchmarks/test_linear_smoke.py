"""`benchmarks/linear.py` end to end (20 calls per variant): every shape runs both GEMMs and the record lists them."""

from __future__ import annotations

import pytest

from dash_kernels import _C
from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
@pytest.mark.skipif(not (_C is not None and _C.has_avx512()), reason="the packed GEMMs need an AVX-512 CPU")
def test_every_shape_times_both_gemms(tmp_path):
    out = tmp_path / "linear"
    record = run_benchmark("linear.py", out, "--calls", "20", "--threads", "1")
    assert len(record["rows"]) == 16  # 8 projections x batches 8 and 256
    assert all(r["torch_us"] > 0 and r["packed_us"] > 0 for r in record["rows"])
    assert out.with_suffix(".md").read_text().count("| tiny |") == 10
