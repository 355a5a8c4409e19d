"""The reproduction pipeline end to end at smoke size: every arm runs, the report and the plot are written.

This checks that `benchmarks/reproduce.py` works (configs parse, every arm trains and evaluates, the report covers
the six experiments and the selection rules); the numbers it prints at 3 steps mean nothing. The full run is
`python benchmarks/reproduce.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 600  # ~30 s on an idle 2-core VM; generous for a loaded CI machine


@pytest.mark.slow
def test_reproduce_smoke_runs_every_arm(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reproduce import ARMS

    out = tmp_path / "repro"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "reproduce" and record["seeds"] == 1 and record["steps"] == 3
    assert set(record["arms"]) == set(ARMS)
    for arm, v in record["arms"].items():
        assert 0.0 <= v["final"] <= 1.0 and v["s_per_step"] > 0, arm
    # Filtering really drops samples: DASH keeps a strict subset, the unfiltered arms keep all of them.
    assert record["arms"]["grpo"]["kept_frac"] == 1.0 and record["arms"]["no_gf"]["kept_frac"] == 1.0
    assert 0.0 < record["arms"]["dash"]["kept_frac"] < 1.0
    report = out.with_suffix(".md").read_text()
    assert all(f"## {n}. " in report for n in range(1, 8)) and report.count("**Ours:**") == 7  # 7: selection rules
    assert record["arms"]["pods"]["kept_frac"] <= 0.5  # PODS keeps 2 of each group's 4 samples
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert not (tmp_path / "repro_runs.jsonl").exists()  # smoke runs never feed the cache of the real run


@pytest.mark.slow
def test_reproduce_rejects_unknown_arm(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--arms", "dash,nope", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--arms: unknown ['nope']" in proc.stderr
