"""Which dash_kernels._C to build, and whether a built one matches the torch that imports it.

Pure functions, no torch import: setup.py loads this file by path before torch's build helpers run (so it can point
CUDA_HOME at the real toolkit), tests feed it faked versions, and dash_kernels._ext checks the build record at import.

Two failure modes this module turns into clear messages instead of a failed install or an undefined-symbol trace:
  * the CUDA toolkit does not fit torch (no nvcc, a wrapper nvcc, another CUDA major): setup.py warns and builds the
    CPU-only _C; CUDA tensors then take the Triton / torch paths;
  * _C compiled against one torch and imported under another (pip's build isolation compiles against a freshly
    downloaded torch): the build writes RECORD_NAME next to the .so, and import compares it with the running torch.
"""

import json
import os
import re
import subprocess
from dataclasses import dataclass

RECORD_NAME = "_C_build.json"  # written next to _C*.so by setup.py's build_ext; git-ignored, not in the sdist
REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e .   (or: make install)"
NVCC_TIMEOUT_S = 60  # `nvcc --version` / `--dryrun` take well under a second; a hung toolkit must not hang pip


@dataclass(frozen=True)
class CudaPlan:
    """setup.py's decision: compile the CUDA kernels or not, and the sentence that says why."""

    build_cuda: bool
    reason: str


def major(version: str) -> int:
    """'13.0' -> 13; '12.4.1' -> 12."""
    return int(version.split(".")[0])


def parse_nvcc_release(text: str) -> str | None:
    """The 'MAJOR.MINOR' of `nvcc --version` output ('Cuda compilation tools, release 13.0, V13.0.88'), or None."""
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def parse_nvcc_home(dryrun_text: str) -> str | None:
    """The toolkit root from `nvcc --dryrun` output: its `_HERE_=<root>/bin` line names the real binary's folder even
    when the nvcc on PATH is a wrapper script or a symlink (then torch's guess, dirname(dirname(which nvcc)), is
    wrong: /usr/local for /usr/local/bin/nvcc)."""
    found = re.search(r"^#\$ _HERE_=(.+)$", dryrun_text, re.MULTILINE)
    return os.path.dirname(found.group(1).strip().rstrip("/")) if found else None


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


def find_toolkit(nvcc: str | None) -> str | None:
    """The CUDA toolkit folder that the executable `nvcc` really runs from (None: no nvcc, or it does not run)."""
    if nvcc is None:
        return None
    out = _run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull])
    return parse_nvcc_home(out) if out else None


def nvcc_release(cuda_home: str | None) -> str | None:
    """'MAJOR.MINOR' of <cuda_home>/bin/nvcc when it runs and the toolkit has its runtime header; otherwise None."""
    if not cuda_home or not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return None
    out = _run([os.path.join(cuda_home, "bin", "nvcc"), "--version"])
    return parse_nvcc_release(out) if out else None


def cuda_build_plan(torch_cuda: str | None, nvcc: str | None, skip: bool, cuda_home: str | None = None) -> CudaPlan:
    """Whether to compile csrc/*.cu. torch_cuda: torch.version.cuda ('13.0', None for a CPU torch); nvcc: the
    toolkit's release (nvcc_release) or None. Any mismatch gives the CPU-only _C with a reason, never an error:
    torch's own build helper raises on a CUDA major mismatch, which would fail the whole install."""
    cpu_only = "building the CPU-only dash_kernels._C (CUDA tensors use the Triton / torch paths)"
    if skip:
        return CudaPlan(False, f"DASH_SKIP_CUDA_BUILD=1: {cpu_only}")
    if torch_cuda is None:
        return CudaPlan(False, f"torch is a CPU build: {cpu_only}")
    if nvcc is None:
        return CudaPlan(False, f"torch is built with CUDA {torch_cuda} but no usable CUDA toolkit was found "
                               f"(CUDA_HOME={cuda_home}: needs bin/nvcc and include/cuda_runtime.h): {cpu_only}. "
                               f"For the CUDA kernels install the CUDA {major(torch_cuda)} toolkit and set CUDA_HOME")
    if major(nvcc) != major(torch_cuda):
        return CudaPlan(False, f"nvcc is CUDA {nvcc} (CUDA_HOME={cuda_home}) but torch is built with CUDA "
                               f"{torch_cuda}; the majors must match: {cpu_only}. For the CUDA kernels point CUDA_HOME "
                               f"at a CUDA {major(torch_cuda)} toolkit")
    return CudaPlan(True, f"building the CUDA kernels with nvcc {nvcc} (CUDA_HOME={cuda_home}) for torch CUDA "
                          f"{torch_cuda}")


def build_record(torch_version: str, torch_cuda: str | None, with_cuda: bool) -> str:
    """The JSON text setup.py writes next to the .so: the torch it compiled against."""
    return json.dumps({"torch": torch_version, "torch_cuda": torch_cuda, "with_cuda": with_cuda}) + "\n"


def _release(version: str) -> str:
    """'2.13.0+cu130' -> '2.13.0': the local tag (+cpu / +cu130) does not change the C++ ABI of libtorch_cpu."""
    return version.split("+", 1)[0]


def mismatch_message(record: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a _C built as `record` cannot load under the running torch, with the fix; None when it can."""
    built = record["torch"]
    if _release(built) != _release(torch_version):
        why = "a C++ extension only loads under the torch release it was compiled against"
    elif record["with_cuda"] and torch_cuda is None:
        why = "it has CUDA kernels, which need a CUDA build of torch"
    else:
        return None
    return (f"dash_kernels._C was built against torch {built} but torch {torch_version} is installed: {why}. "
            f"Rebuild it against the installed torch with: {REBUILD_COMMAND}. Without --no-build-isolation, pip "
            f"compiles against a freshly downloaded torch instead of yours.")


def check_record(path: str, torch_version: str, torch_cuda: str | None) -> None:
    """Raises ImportError with mismatch_message when the build record at `path` does not fit the running torch.
    No record (a build from before records existed, or no build at all): nothing to compare, no error."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    message = mismatch_message(record, torch_version, torch_cuda)
    if message:
        raise ImportError(message)
