# The commands of the README: `make demo` and `make test` (both install into ./.venv first), and
# `make gpu-check` on a lent GPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU wheel of torch (a file on local disk where provided) before anything
# else, so that no dependency pulls a multi-GB CUDA build. On a CUDA machine bring your own torch.
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
NPROC ?= 4

.PHONY: install demo test lint gpu-check clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install "$(TORCH_CPU)"
endif
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py --nproc $(NPROC)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

# Kernel equality and throughput on a lent GPU (JSON + markdown under runs/gpu_check); without a
# GPU it prints its plan and exits 0. Uses ./.venv when there is one, else the image's python.
CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(CHECK_PY) tools/gpu_check.py --out runs/gpu_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
