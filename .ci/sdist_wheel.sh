#!/usr/bin/env bash
# Builds the sdist from the working tree, then a wheel from that sdist alone in a clean folder, with the Python $PY
# (its torch is what _C compiles against: --no-build-isolation). Proves the sdist holds every header and source
# (MANIFEST.in), and never touches the working tree's own build of dash_kernels/_C*.so.
#   usage: PY=.venv/bin/python bash .ci/sdist_wheel.sh OUTDIR     -> OUTDIR/dist/*.tar.gz, OUTDIR/wheel/*.whl
# Used by `make sdist-check` (CPU torch) and .ci/cuda_build_check.sh (CUDA torch). Extra environment (CUDA_HOME,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS) passes through to setup.py. The full build log is OUTDIR/build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:?usage: sdist_wheel.sh OUTDIR}
mkdir -p "$out/dist" "$out/src" "$out/wheel"
log="$out/build.log"
# --isolated: ignore pip's config and PIP_* variables (a local find-links torch, constraints); nothing is downloaded.
pip_=("$PY" -m pip --isolated --disable-pip-version-check)

"$PY" -m build --sdist --no-isolation -x --outdir "$out/dist" . >"$log" 2>&1 || { tail -40 "$log"; exit 1; }
sdist=$(ls "$out"/dist/*.tar.gz)
tar -xzf "$sdist" -C "$out/src"
src=$(ls -d "$out"/src/*/)
echo "sdist: $(basename "$sdist") ($(tar -tzf "$sdist" | grep -c '^[^/]*/csrc/.') files under csrc/)"

"${pip_[@]}" wheel -v --no-build-isolation --no-deps -w "$out/wheel" "$src" >>"$log" 2>&1 \
  || { tail -60 "$log"; echo "wheel build from the sdist FAILED (log: $log)"; exit 1; }
wheel=$(ls "$out"/wheel/*.whl)
members=$("$PY" -m zipfile -l "$wheel")
for want in 'dash_kernels/_C\.[^ ]*\.so' 'dash_kernels/_C_build\.json'; do
  echo "$members" | grep -qE "$want" || { echo "$wheel lacks $want"; exit 1; }
done
echo "wheel from the sdist: $(basename "$wheel") (has _C and its build record)"
