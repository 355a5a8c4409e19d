# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install (builds dash_kernels._C), run the tiny CPU demo (step time, then learning)
#   make test   - same set-up, then the whole test suite
# The venv sees system site-packages so an existing (e.g. CUDA) torch is kept; with no torch at all we install the
# pinned CPU build rather than letting pip resolve `torch` to a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench cuda-check clean

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

demo: install
	$(PY) benchmarks/step_time.py --config configs/tiny.yaml
	$(PY) benchmarks/train_curve.py --config configs/tiny-add.yaml --eval-every 50 --out runs/train_curve_add

bench: install
	$(PY) benchmarks/fused_loss.py

# Compile every csrc/*.cu for sm_80 and sm_90 with nvcc and fail on register spills (no GPU needed).
cuda-check:
	bash .ci/nvcc_check.sh

clean:
	rm -rf $(VENV) build *.egg-info dash_kernels/_C*.so
