"""Runs a benchmark script end to end for a smoke test and returns the JSON record it wrote next to `out`.

Every script ends its stdout with the record as one JSON line carrying benchmarks/common.py's COMMON_KEYS, `bench`
being the script's name; this checks both, so a script that stops sharing the format fails its smoke test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import COMMON_KEYS  # noqa: E402


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    """`python benchmarks/<script> *args --out <out>` (failing the test if it fails); returns <out>.json."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], check=True,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    record = json.loads(out.with_suffix(".json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == record
    assert record["bench"] == Path(script).stem and set(COMMON_KEYS) <= set(record), sorted(record)
    return record
