# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install (builds dash_kernels._C), run the tiny CPU demo (step time, then RL vs its
#                 supervised control on the reasoning task)
#   make test   - same set-up, then the whole test suite
#   make test-fast - the tests not marked `slow` (no torchrun, benchmark or CLI-subprocess runs): the edit loop
# The venv sees system site-packages so an existing (e.g. CUDA) torch is kept; with no torch at all we install the
# pinned CPU build rather than letting pip resolve `torch` to a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench cuda-check cuda-build-check sdist-check gpu-check gpu-wheels clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install $(TORCH_PIN); fi
	$(PY) -m pip install setuptools wheel ninja pybind11
	$(PY) -m pip install -e '.[dev]' --no-build-isolation
	$(PY) -c "import dash_kernels._C"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Target: under 2 minutes on an idle 2-core machine (2 min 45 s measured on a shared one at load 3-4).
# `make test` still runs everything, the `slow` tests included.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) benchmarks/step_time.py --config configs/tiny.yaml
	$(PY) benchmarks/rl_crosscheck.py --config configs/tiny-scratchpad.yaml --arms trainer,supervised --eval-every 25 \
		--out runs/rl_vs_sft

bench: install
	$(PY) benchmarks/fused_loss.py

# Compile every csrc/*.cu for sm_80 and sm_90 with nvcc and fail on register spills (no GPU needed).
cuda-check:
	bash .ci/nvcc_check.sh

# A real CUDA build without a GPU: CUDA torch in .venv-cuda (4.7 GB, reused between runs), sdist -> wheel with the
# CUDA kernels, dispatcher check, setup.py's CPU fallbacks. Needs nvcc; minutes (see .ci/cuda_build_check.sh).
cuda-build-check:
	bash .ci/cuda_build_check.sh

# The sdist builds on its own: sdist, then a wheel (CPU _C) from it alone in a temporary folder.
sdist-check: install
	@out=$$(mktemp -d) && PY=$(PY) bash .ci/sdist_wheel.sh $$out; status=$$?; rm -rf $$out; exit $$status

# On a GPU machine (no network needed): install from this tree, build _C's CUDA kernels for the GPU, run the cuda
# tests (tests/gpu) and short GPU benchmarks, print a table and a JSON line, in under 8 minutes (.ci/gpu_check.py).
gpu-check:
	bash .ci/gpu_check.sh

# Wheels of the pure-Python packages the GPU image lacks (.ci/gpu_wheels.txt) into wheels/, for the device call.
gpu-wheels:
	@mkdir -p wheels; reqs=$$(grep -v '^[[:space:]]*#' .ci/gpu_wheels.txt | grep -v '^[[:space:]]*$$' || true); \
	if [ -n "$$reqs" ]; then $(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp -d wheels $$reqs; \
	else echo "gpu-wheels: .ci/gpu_wheels.txt lists no package (the GPU image has every dependency)"; fi

clean:
	rm -rf $(VENV) build *.egg-info dash_kernels/_C*.so dash_kernels/_C_build.json
