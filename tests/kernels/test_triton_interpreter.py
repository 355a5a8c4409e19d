"""Runs interp_cases.py (every Triton kernel, on CPU) in a subprocess with TRITON_INTERPRET=1.

A subprocess because the interpreter flag must be set before triton is imported, and this pytest process has
imported it already (and must keep compiled-kernel semantics for the rest of the suite).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.parametrize("cases", ["interp_cases.py", "interp_kv_cases.py", "interp_sample_cases.py",
                                   "interp_paged_cases.py", "interp_fused_bwd_cases.py"])
def test_triton_kernels_under_interpreter(cases):
    env = dict(os.environ, TRITON_INTERPRET="1", DASH_KERNELS_BACKEND="triton")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / cases)],
        cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
