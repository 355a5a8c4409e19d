"""The torch floor (dash_kernels/torch_floor.py): pyproject.toml admits no torch the code cannot run on, each feature
behind the floor exists in the installed torch, and an older torch fails at import with the version and the fix.

The floor used to be `torch>=2.4` while the code called torch.mm(out_dtype=) (2.8): a bf16 run on 2.4-2.7 died at
its first sampling step. test_pyproject_floor_is_the_newest_feature would have caught it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dash_kernels import torch_floor

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_floor_is_the_newest_feature():
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]  # [project] dependencies (no tomllib on 3.10)
    torch_reqs = re.findall(r'"(torch\b[^"]*)"', deps)
    assert len(torch_reqs) == 1, torch_reqs
    floor = re.fullmatch(r"torch>=(\d+)\.(\d+)", torch_reqs[0].replace(" ", ""))
    assert floor, f"pyproject.toml must pin torch as torch>=X.Y, got {torch_reqs[0]!r}"
    assert (int(floor.group(1)), int(floor.group(2))) == torch_floor.MIN_TORCH == max(
        torch_floor.FEATURE_VERSIONS.values())


def test_every_feature_behind_the_floor_exists_in_the_installed_torch():
    """Probes of the three calls, on CPU / meta tensors: if one fails, the table (or the code's use) is wrong."""
    a = torch.randn(2, 3, dtype=torch.bfloat16, device="meta")
    b = torch.randn(3, 4, dtype=torch.bfloat16, device="meta")
    assert torch.mm(a, b, out_dtype=torch.float32).dtype == torch.float32  # the CUDA kernel's meta twin
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # 4 query heads over 2 K/V heads
    out = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert out.shape == q.shape
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    assert set(torch_floor.FEATURE_VERSIONS) == {"torch.mm(..., out_dtype=)",
                                                 "F.scaled_dot_product_attention(..., enable_gqa=)",
                                                 "torch.distributed.fsdp.fully_shard"}


@pytest.mark.parametrize("version", ["2.8.0", "2.8.0a0+gitabc", "2.13.0+cu130", "3.0.1"])
def test_supported_versions_pass(version):
    torch_floor.check_torch_version(version)
    torch_floor.check_torch_version()  # the running torch


@pytest.mark.parametrize("version,missing", [("2.4.1", "enable_gqa"), ("2.7.1+cu126", "out_dtype"),
                                             ("1.13.0", "fully_shard")])
def test_older_torch_fails_naming_version_and_fix(version, missing, monkeypatch):
    with pytest.raises(ImportError, match=re.escape(f"found torch {version}")) as err:
        torch_floor.check_torch_version(version)
    assert missing in str(err.value) and "pip install 'torch>=2.8'" in str(err.value)
    monkeypatch.setattr(torch, "__version__", version)  # the default reads the running torch's version
    with pytest.raises(ImportError, match="needs torch >= 2.8"):
        torch_floor.check_torch_version()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["dash_kernels", "dash.model", "dash.rl.fsdp"])
def test_import_fails_at_once_on_an_old_torch(module):
    """Importing the model, the FSDP wrapper (whose `fully_shard` import would fail first on torch < 2.6) or
    dash_kernels on torch 2.7 raises the floor's ImportError before any feature is used."""
    code = f"import torch; torch.__version__ = '2.7.1'; import {module}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0
    assert "ImportError: dash-rl needs torch >= 2.8, found torch 2.7.1" in proc.stderr, proc.stderr[-2000:]


def test_version_parse_rejects_garbage():
    with pytest.raises(ValueError, match="cannot read a torch version"):
        torch_floor.parse_version("nightly")
