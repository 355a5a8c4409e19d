#!/usr/bin/env bash
# Compiles every csrc/*.cu for sm_80 and sm_90, plus the sm_90 PTX setup.py embeds (plain C ABI: no torch headers
# needed) and fails on any register spill. Also syntax-checks the CUDA torch binding (csrc/*_cuda.cpp) against the
# installed torch's headers; the CPU wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h), which we
# stub with an empty file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
shopt -s nullglob
status=0
for cu in csrc/*.cu; do
  log=$(nvcc -c -o /dev/null -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_90,code=compute_90 \
        -Xptxas -v "$cu" 2>&1) || { echo "$log"; echo "nvcc FAILED: $cu"; exit 1; }
  regs=$(echo "$log" | grep -oE "Used [0-9]+ registers" | awk '{print $2}' | sort -n | tail -1)
  spills=$(echo "$log" | grep -oE "[0-9]+ bytes spill (stores|loads)" | awk '{s+=$1} END {print s+0}')
  echo "nvcc sm_80+sm_90 $cu: max registers ${regs:-0}, spill bytes $spills"
  if [ "$spills" != "0" ]; then echo "$log"; echo "register spills in $cu"; status=1; fi
done
if [ -x "$PY" ]; then
  inc=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
  stub=$(mktemp -d); mkdir -p "$stub/c10/cuda/impl"; touch "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  cuda_inc=$(dirname "$(dirname "$(command -v nvcc)")")/include
  [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=$(ls -d /usr/local/cuda*/include 2>/dev/null | head -1)
  for cpp in csrc/*_cuda.cpp; do
    g++ -std=c++20 -fsyntax-only -DDASH_WITH_CUDA -I"$stub" -I"$inc" -I"$inc/torch/csrc/api/include" \
        -I"$cuda_inc" "$cpp" && echo "g++ syntax check (CUDA binding) $cpp: ok" || status=1
  done
  rm -rf "$stub"
fi
exit $status
