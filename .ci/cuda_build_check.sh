#!/usr/bin/env bash
# `make cuda-build-check`: a real CUDA build of dash_kernels._C on a machine with nvcc and no GPU.
#  1. A separate venv ($CUDA_VENV, default .venv-cuda, git-ignored) with the CUDA torch from the public index
#     (torch==2.13.0 is 2.13.0+cu130 plus its CUDA runtime packages, 4.7 GB). Reused when it already holds that torch,
#     so a second run on one machine downloads nothing; a missing or broken one is built from scratch.
#  2. CUDA_HOME = the toolkit the `nvcc` on PATH really runs from (it may be a wrapper script; torch's own guess,
#     dirname(dirname(which nvcc)), is then wrong), unless CUDA_HOME is already set.
#  3. The sdist, then a wheel built from it alone (.ci/sdist_wheel.sh): the CUDA branch of setup.py compiles
#     csrc/*.cu with nvcc and links csrc/*_cuda.cpp against torch's real CUDA headers, for setup.py's default archs
#     (sm_80 + sm_90 + sm_90 PTX) unless TORCH_CUDA_ARCH_LIST is set. The working tree's _C*.so is never touched.
#  4. The wheel installed into the venv and imported from outside the source tree: the dispatcher must have a CUDA
#     kernel for exactly the ops dash_kernels._ext.CUDA_KERNEL_OPS names, CPU kernels for all
#     (.ci/cuda_dispatch_check.py).
#  5. setup.py's fallbacks under the CUDA torch, decision only (no compile): no toolkit, and an nvcc of another CUDA
#     major, must each warn and choose the CPU-only _C (tests/packaging/test_build_compat.py: the logic).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_PIN=${CUDA_TORCH_PIN:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
PY="$root/$VENV/bin/python"
command -v nvcc >/dev/null || { echo "cuda-build-check: no nvcc on PATH (needs a CUDA toolkit, no GPU)"; exit 1; }
work=$(mktemp -d -t dash-cuda-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
now() { date +%s; }
declare -a summary

# 1. venv with the CUDA torch (reused when it already holds it)
t=$(now)
want=${TORCH_PIN#torch==}
has_torch() {
  "$PY" -c "import sys, torch
sys.exit(0 if torch.__version__.split('+')[0] == '$want' and torch.version.cuda else 1)" 2>/dev/null
}
if [ -x "$PY" ] && has_torch; then
  reused=" (reused $VENV)"
else
  reused=""
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # --isolated: the public index, not this machine's pip config (its local CPU torch wheel and torch constraint).
  "$PY" -m pip --isolated --disable-pip-version-check install -q "$TORCH_PIN" numpy
  has_torch || { echo "cuda-build-check: $TORCH_PIN in $VENV is not a CUDA build"; exit 1; }
fi
"$PY" -m pip --isolated --disable-pip-version-check install -q setuptools wheel ninja pybind11 build
summary+=("venv + CUDA torch$reused|$(( $(now) - t ))")
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"

# 2. the real toolkit folder, and setup.py's own decision for it (fails early and clearly on a major mismatch)
compat() {  # runs python code with `m` = dash_kernels/build_compat.py, loaded by path (no package import)
  "$PY" -c "import importlib.util as u, os, shutil, sys, torch
s = u.spec_from_file_location('build_compat', 'dash_kernels/build_compat.py'); m = u.module_from_spec(s)
sys.modules[s.name] = m; s.loader.exec_module(m)
$1"
}
export CUDA_HOME=${CUDA_HOME:-$(compat "print(m.find_toolkit(shutil.which('nvcc')) or '')")}
plan=$(compat "p = m.cuda_build_plan(torch.version.cuda, m.nvcc_release(os.environ['CUDA_HOME']), False,
                                      os.environ['CUDA_HOME']); print(p.reason); sys.exit(0 if p.build_cuda else 1)") \
  || { echo "cuda-build-check: setup.py would not build CUDA: $plan"; exit 1; }
echo "CUDA_HOME=$CUDA_HOME: $plan"

# 3. sdist -> wheel with the CUDA branch
t=$(now)
PY="$PY" bash .ci/sdist_wheel.sh "$work"
grep -q "building the CUDA kernels" "$work/build.log" || { echo "setup.py did not take the CUDA branch"; exit 1; }
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  for arch in 80 90; do
    grep -q "nvcc.*arch=compute_$arch,code=sm_$arch" "$work/build.log" || { echo "no nvcc call for sm_$arch"; exit 1; }
  done
fi
archs=${TORCH_CUDA_ARCH_LIST:-8.0;9.0 + 9.0 PTX}
summary+=("sdist + CUDA wheel build (MAX_JOBS=$MAX_JOBS, archs $archs)|$(( $(now) - t ))")

# 4. install it, import from outside the source tree, check the dispatcher
t=$(now)
"$PY" -m pip --isolated --disable-pip-version-check install -q --no-deps --force-reinstall "$work"/wheel/*.whl
(cd "$work" && "$PY" "$root/.ci/cuda_dispatch_check.py")
summary+=("install wheel + dispatcher check|$(( $(now) - t ))")

# 5. fallbacks: decision only, with the sdist's setup.py under the CUDA torch
t=$(now)
src=$(ls -d "$work"/src/*/)
no_nvcc_path=$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd:)
fake="$work/fake-cuda-12"
mkdir -p "$fake/bin" "$fake/include"; touch "$fake/include/cuda_runtime.h"
printf '#!/bin/sh\necho "Cuda compilation tools, release 12.4, V12.4.131"\n' >"$fake/bin/nvcc"
chmod +x "$fake/bin/nvcc"
for case in "no toolkit|$work/no-such-cuda|no usable CUDA toolkit" "CUDA 12 nvcc|$fake|nvcc is CUDA 12.4"; do
  IFS='|' read -r name home expect <<<"$case"
  out=$(cd "$src" && PATH="$no_nvcc_path" CUDA_HOME="$home" "$PY" setup.py --name 2>&1) \
    || { echo "$out"; echo "setup.py failed with $name"; exit 1; }
  echo "$out" | grep -q "$expect" && echo "$out" | grep -q "CPU-only" \
    || { echo "$out"; echo "setup.py did not warn and fall back with $name"; exit 1; }
  echo "fallback, $name: setup.py warns and chooses the CPU-only _C"
done
summary+=("fallback decisions (no toolkit, CUDA 12 nvcc)|$(( $(now) - t ))")

echo "cuda-build-check: passed"
for row in "${summary[@]}"; do IFS='|' read -r what secs <<<"$row"; printf '  %-70s %5s s\n' "$what" "$secs"; done
