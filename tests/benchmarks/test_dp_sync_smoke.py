"""`benchmarks/dp_sync.py` end to end at smoke size: 2 gloo ranks, one timed step, every strategy and plan.

The benchmark wraps the trainer's model for torch DDP, so a change to `forward_packed`'s signature or to the packing
breaks it; it also aborts when a strategy's summed gradient differs from one-sync's. The timings mean nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 300  # ~11 s on an idle 2-core VM


@pytest.mark.slow
def test_dp_sync_smoke_runs_every_strategy():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dp_sync import GRAD_CHECK_RTOL, STRATEGIES

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/dp_sync.py"), "--steps", "1", "--nproc", "2"],
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "dp_sync" and record["nproc"] == 2
    assert {(r["plan"], r["strategy"]) for r in record["rows"]} == {
        (p, s) for p in ("packed", "paper-mb") for s in STRATEGIES}
    assert all(r["max_rel_grad_diff"] <= GRAD_CHECK_RTOL for r in record["rows"])
