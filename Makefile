# The README's two commands: `make train` and `make test`. Both install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
ARGS ?=

.PHONY: setup train test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU machines get the CPU wheel of torch (on this workplace's disk); GPU machines get the default CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch>=2.6"; \
	else $(BIN)/pip install torch==2.13.0 || $(BIN)/pip install torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/kiln train tiny $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench scripts

bench: setup
	$(BIN)/python bench/vs_hf.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
