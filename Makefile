# Every target sets itself up: `make test` and `make train` work from a fresh clone.
# On a GPU machine:  make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" ORT=onnxruntime-gpu
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ORT ?= onnxruntime
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.DEFAULT_GOAL := help
.PHONY: help install train export run bench test lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv: torch first (pinned), then the runtime (./runtime), then the toolkit with dev + hf + cluster extras

$(STAMP): pyproject.toml runtime/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(ORT)
	$(BIN)/python -m pip install -q -e ./runtime
	$(BIN)/python -m pip install -q -e ".[dev,hf,cluster]"
	touch $(STAMP)

train: $(STAMP)  ## main job: train graphs/default.yaml on digits, export per stage, run with onnxruntime
	$(BIN)/rlhf train graphs/default.yaml --run-dir runs/default --overwrite --export

export: $(STAMP)  ## export the run of `make train` to runs/default/export
	$(BIN)/rlhf export runs/default -o runs/default/export --overwrite

run: $(STAMP)  ## run the exported stages with onnxruntime on digits test samples
	$(BIN)/python examples/run_export.py runs/default/export

bench: $(STAMP)  ## benchmarks: optimizer, runtime, factorization (figures -> docs/benchmarks/)
	$(BIN)/python benchmarks/run_all.py

test: $(STAMP)  ## the test suite (unit + end-to-end), CPU; GPU tests skip without CUDA
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check toolkit runtime tests examples benchmarks
	$(BIN)/ruff format --check toolkit runtime tests examples benchmarks
	$(BIN)/mypy

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
