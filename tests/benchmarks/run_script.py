"""Runs a benchmark script end to end for a smoke test and returns the JSON record it wrote next to `out`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    """`python benchmarks/<script> *args --out <out>` (failing the test if it fails); returns <out>.json."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=TIMEOUT_S)
    return json.loads(out.with_suffix(".json").read_text())
