# The README's two commands: `make train` and `make test`. Both install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
DEV_STAMP := $(VENV)/.kiln-dev-installed
ARGS ?=
TEST_WORKERS ?= 2  # the suite runs in parallel pytest-xdist workers; each gets cpu_count / workers threads

.PHONY: setup train test test-fast test-gguf lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU machines get the CPU wheel of torch (PyTorch's CPU index, else a local or PyPI wheel); GPU machines get the
# default CUDA build. `make train` installs what training and the README's exports need; `make test` adds [dev]
# (pytest, ruff, lm-eval, wandb, torchao: torchao's import prints library errors when transformers loads a model).
$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.6"; \
	else $(BIN)/pip install -q --retries 0 --timeout 10 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
		|| $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[gguf]"
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(DEV_STAMP)

setup: $(DEV_STAMP)

train: $(STAMP)
	$(BIN)/kiln train demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests $(ARGS)

# GGUF files run by llama.cpp itself: builds llama-cpp-python once (compiles llama.cpp, 10-20 min on 2 cores)
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
test-gguf: setup
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(BIN)/pip install "$(LLAMA_CPP_PYTHON)"
	$(BIN)/python -m pytest -q tests/test_gguf.py tests/test_gguf_llama_cpp.py $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench scripts

bench: setup
	$(BIN)/python bench/vs_hf.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
