"""The README's Python example is examples/quickstart.py, word for word, and it runs.

The README shows the file's text so a reader can paste it; this test fails when either is edited without the other
(`test_readme_shows_the_quickstart_file`) and when the example stops running or printing what the README says
(`test_quickstart_runs`: five steps of the tiny task, then a held-out accuracy).
Run: .venv/bin/python -m pytest -q tests/test_readme_example.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
STEPS = 5  # the example's --train.steps
QUICKSTART_TIMEOUT_S = 600  # ~20 s on an idle 2-core machine; generous for a loaded CI box
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_STEP_LINE = re.compile(r"step (\d+): reward (\d\.\d{3}), kept (\d\.\d{2}), (\d+\.\d{3}) s")
_ACC_LINE = re.compile(r"held-out greedy accuracy (\d\.\d{3})")


def test_readme_shows_the_quickstart_file():
    blocks = _PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    shown = [b for b in blocks if "examples/quickstart.py" in b or "Trainer(" in b]
    assert shown, "README.md has no ```python block with the quickstart example"
    assert shown[0] == QUICKSTART.read_text(), "README.md's python example differs from examples/quickstart.py"


@pytest.mark.slow
def test_quickstart_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(QUICKSTART)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=QUICKSTART_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == STEPS + 1, proc.stdout
    for i, line in enumerate(lines[:STEPS], start=1):
        m = _STEP_LINE.fullmatch(line)
        assert m and int(m[1]) == i, line
        assert 0.0 <= float(m[2]) <= 1.0 and 0.0 < float(m[3]) <= 1.0, line  # binary rewards; the filter kept some
    m = _ACC_LINE.fullmatch(lines[-1])
    assert m and 0.0 < float(m[1]) <= 1.0, lines[-1]
