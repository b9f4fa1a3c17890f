# glmctl — set-up, tests, benchmarks and the demo pipeline.
#
#   make test     create .venv if missing, install everything, run the test suite
#   make demo     run every stage on the sample corpus (see the README)
#
# Targets of the pipeline are artifact manifests: a stage reruns only when its inputs changed.

SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GLMCTL := $(VENV)/bin/glmctl

# Building the kernels: nvcc on PATH here is a wrapper, torch needs the real toolkit root, and a
# machine without a GPU has no arch to detect (environment-notes §1.3).
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;8.9;9.0
export MAX_JOBS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

STAMP := $(VENV)/.glmctl-installed
SETUP_INPUTS := pyproject.toml setup.py constraints.txt $(wildcard kernels/build.py kernels/csrc/*)

.PHONY: help setup test test-fast bench gpu-check kernels-report clean-venv
help:
	@echo "make setup           install into $(VENV) (idempotent)"
	@echo "make test            set up, then run the whole test suite"
	@echo "make demo            the whole pipeline on the sample corpus (demo/REPORT.md)"
	@echo "make bench           CPU benchmarks (ratios against baselines in the same run)"
	@echo "make gpu-check       on a CUDA machine: build, check and benchmark the CUDA kernels"
	@echo "make kernels-report  registers / spills / shared memory of every CUDA kernel"

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "setuptools>=64" wheel torch numpy ninja
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: setup
	$(PY) bench/kernels_cpu.py
	$(PY) bench/tokenize.py
	$(PY) bench/pretrain.py
	$(PY) bench/evaluate.py
	$(PY) bench/generate.py

# On a GPU machine that already has torch (no .venv needed): builds with the machine's torch.
gpu-check:
	python3 bench/gpu_check.py

kernels-report: setup
	$(PY) -m glmctl.kernels.report

clean-venv:
	rm -rf $(VENV)
