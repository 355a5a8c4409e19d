"""Run by .ci/cuda_build_check.sh in the CUDA venv, from outside the source tree: the installed wheel's _C is a real
CUDA build, and the dispatcher has a CUDA kernel for exactly the dash ops dash_kernels._ext.CUDA_KERNEL_OPS names (CPU
kernels for all). Needs no GPU: registration happens when the library loads. Prints one table; exit 1 on a mismatch.
"""

import json
import os
import sys

import torch

import dash_kernels  # noqa: F401  (loads _C, which registers the torch.ops.dash ops)
from dash_kernels import _ext, build_compat


def main() -> int:
    where = os.path.dirname(_ext.__file__)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}); "
          f"dash_kernels from {where}")
    c = _ext.require_c()
    with open(os.path.join(where, build_compat.RECORD_NAME), encoding="utf-8") as f:
        record = json.load(f)
    problems = []
    if "site-packages" not in where:
        problems.append(f"dash_kernels imported from {where}, not from the installed wheel")
    if not (c.WITH_CUDA and record["with_cuda"]):
        problems.append(f"_C is not a CUDA build (WITH_CUDA={c.WITH_CUDA}, record {record})")
    table = _ext.dispatch_table()
    missing = set(_ext.CUDA_KERNEL_OPS) - set(table)
    if missing:
        problems.append(f"CUDA_KERNEL_OPS names ops _C does not register: {sorted(missing)}")
    print(f"{'op':<24}{'CPU':<6}{'CUDA':<6}expected CUDA")
    for name, (cpu, cuda) in table.items():
        expect = name in _ext.CUDA_KERNEL_OPS
        print(f"dash::{name:<18}{'yes' if cpu else 'NO':<6}{'yes' if cuda else 'no':<6}{'yes' if expect else 'no'}")
        if not cpu:
            problems.append(f"dash::{name} has no CPU kernel")
        if cuda != expect:
            problems.append(f"dash::{name}: CUDA kernel {'present' if cuda else 'missing'}, CUDA_KERNEL_OPS says "
                            f"{'yes' if expect else 'no'}")
    for p in problems:
        print("FAIL:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
