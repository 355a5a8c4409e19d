#!/usr/bin/env bash
# `make gpu-check`: install, build _C with CUDA, run the cuda tests and short GPU benchmarks on this machine, then one
# table and one JSON line (see .ci/gpu_check.py). Python: $PY, else this checkout's .venv, else python3 (a bare GPU
# machine, where python3 holds torch). Writes its logs and gpu_check.json to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" .ci/gpu_check.py "$@"
