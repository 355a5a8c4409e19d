"""A benchmark script's name must not be the name of an installed top-level module.

`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a script named like an installed package shadows it
for every library the script imports. transformers 5.25 imports the `kernels` package (HF's hub kernels) from its
activations module, and benchmarks/kernels.py (now fused_loss.py) broke every benchmark that built an HF model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _installed_elsewhere(name: str) -> str | None:
    """Where `import name` resolves with benchmarks/ and the repo root off sys.path (None: nowhere)."""
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() not in (BENCHMARKS, ROOT)]
    try:
        spec = importlib.util.find_spec(name) if name not in sys.modules else None
    finally:
        sys.path[:] = saved
    if name in sys.modules:
        origin = getattr(sys.modules[name], "__file__", None) or "builtin"
        return None if origin and Path(origin).resolve().parent == BENCHMARKS else origin
    return None if spec is None else (spec.origin or "namespace package")


def test_no_benchmark_script_shadows_an_installed_module():
    clashes = {p.name: where for p in BENCHMARKS.glob("*.py")
               if (where := _installed_elsewhere(p.stem)) is not None}
    assert not clashes, f"rename these benchmark scripts, they shadow installed modules: {clashes}"
