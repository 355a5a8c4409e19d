"""setup.py's CUDA build decision and the import-time torch version check, with faked versions and toolkits.

A real CUDA build runs in `make cuda-build-check` (minutes, a 4.7 GB torch); these cover the decisions it does not
reach on one machine: an nvcc of another CUDA major, no toolkit, a _C built for another torch.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dash_kernels import _ext, build_compat
from dash_kernels.build_compat import cuda_build_plan

NVCC_VERSION_TEXT = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""
PACKAGE_DIR = Path(_ext.__file__).parent


def test_parse_nvcc_release_and_home():
    assert build_compat.parse_nvcc_release(NVCC_VERSION_TEXT) == "13.0"
    assert build_compat.parse_nvcc_release("command not found") is None
    dryrun = "#$ _NVVM_BRANCH_=nvvm\n#$ _HERE_=/usr/local/cuda-13.0/bin\n#$ _THERE_=/usr/local/cuda-13.0/bin\n"
    assert build_compat.parse_nvcc_home(dryrun) == "/usr/local/cuda-13.0"
    assert build_compat.parse_nvcc_home("no marker") is None


@pytest.mark.parametrize(
    ("torch_cuda", "nvcc", "skip", "build_cuda", "named"),
    [
        ("13.0", "13.0", False, True, ["13.0"]),
        ("13.0", "13.2", False, True, ["13.2"]),  # minor differences are fine (torch only warns)
        ("13.0", "12.4", False, False, ["12.4", "13.0", "CPU-only"]),  # torch's helper would raise: we fall back
        ("12.8", "13.0", False, False, ["13.0", "12.8", "CPU-only"]),
        ("13.0", None, False, False, ["no usable CUDA toolkit", "CUDA 13 toolkit", "CPU-only"]),
        (None, "13.0", False, False, ["CPU build"]),
        ("13.0", "13.0", True, False, ["DASH_SKIP_CUDA_BUILD"]),
    ],
)
def test_cuda_build_plan(torch_cuda, nvcc, skip, build_cuda, named):
    plan = cuda_build_plan(torch_cuda, nvcc, skip, cuda_home="/opt/cuda")
    assert plan.build_cuda is build_cuda
    for word in named:
        assert word in plan.reason


def _script(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_nvcc_release_reads_a_fake_toolkit(tmp_path):
    _script(tmp_path / "bin" / "nvcc", "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    assert build_compat.nvcc_release(str(tmp_path)) is None  # no include/cuda_runtime.h: not a usable toolkit
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert build_compat.nvcc_release(str(tmp_path)) == "12.4"
    assert build_compat.nvcc_release(str(tmp_path / "missing")) is None
    assert build_compat.nvcc_release(None) is None


def test_find_toolkit_sees_through_a_wrapper(tmp_path):
    wrapper = _script(tmp_path / "wrapper" / "nvcc", "echo '#$ _HERE_=/opt/cuda-12.4/bin' >&2\n")
    assert build_compat.find_toolkit(wrapper) == "/opt/cuda-12.4"
    assert build_compat.find_toolkit(_script(tmp_path / "broken" / "nvcc", "exit 1\n")) is None
    assert build_compat.find_toolkit(str(tmp_path / "absent")) is None
    assert build_compat.find_toolkit(None) is None


def test_mismatch_message_names_both_versions_and_the_fix():
    cpu = {"torch": "2.12.0+cpu", "torch_cuda": None, "with_cuda": False}
    message = build_compat.mismatch_message(cpu, "2.13.0+cu130", "13.0")
    assert "2.12.0+cpu" in message and "2.13.0+cu130" in message and "--no-build-isolation" in message
    same_release = {"torch": "2.13.0+cpu", "torch_cuda": None, "with_cuda": False}
    assert build_compat.mismatch_message(same_release, "2.13.0+cu130", "13.0") is None
    cuda = {"torch": "2.13.0+cu130", "torch_cuda": "13.0", "with_cuda": True}
    assert "CUDA build of torch" in build_compat.mismatch_message(cuda, "2.13.0+cpu", None)
    assert build_compat.mismatch_message(cuda, "2.13.0+cu130", "13.0") is None


def test_check_record(tmp_path):
    record = tmp_path / build_compat.RECORD_NAME
    build_compat.check_record(str(record), "2.13.0", None)  # no record: nothing to compare
    record.write_text(build_compat.build_record("2.11.0+cu128", "12.8", True))
    with pytest.raises(ImportError, match=r"built against torch 2\.11\.0\+cu128 but torch 2\.13\.0\+cpu"):
        build_compat.check_record(str(record), "2.13.0+cpu", None)
    record.write_text(build_compat.build_record("2.13.0+cpu", None, False))
    build_compat.check_record(str(record), "2.13.0+cpu", None)


def _import_package_copy(tmp_path: Path, recorded_torch: str) -> subprocess.CompletedProcess:
    """`import dash_kernels` from a copy of its Python files next to a build record naming recorded_torch. (An
    editable install's finder may still find the real _C for the copy: the record check runs before that load.)"""
    copy = tmp_path / "dash_kernels"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__", build_compat.RECORD_NAME))
    (copy / build_compat.RECORD_NAME).write_text(build_compat.build_record(recorded_torch, None, False))
    code = "import dash_kernels; print(dash_kernels.__file__); print('HAS_C', dash_kernels.HAS_C)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_import_under_another_torch_names_both_versions(tmp_path):
    done = _import_package_copy(tmp_path, "2.0.0+cu118")
    assert done.returncode != 0
    assert f"built against torch 2.0.0+cu118 but torch {torch.__version__} is installed" in done.stderr
    assert "--no-build-isolation" in done.stderr
    assert "undefined symbol" not in done.stderr


@pytest.mark.slow
def test_import_with_a_matching_record_loads(tmp_path):
    done = _import_package_copy(tmp_path, torch.__version__)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) in done.stdout  # the copy, not the installed package, was imported


def test_dispatcher_matches_cuda_kernel_ops():
    """The ops CUDA_KERNEL_OPS names exist, every dash op has a CPU kernel, and a CPU-only build has no CUDA kernel
    (.ci/cuda_build_check.sh asserts the CUDA side on a real CUDA build)."""
    c = _ext.require_c()
    table = _ext.dispatch_table()
    assert set(_ext.CUDA_KERNEL_OPS) <= set(table), sorted(table)
    assert all(cpu for cpu, _ in table.values()), table
    if not c.WITH_CUDA:
        assert not any(cuda for _, cuda in table.values()), table
