# Two set-up commands: `make run` and `make test`. Both work on a fresh clone of a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first and pinned: this machine has that CPU wheel on disk; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: run test install dev lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

run: $(VENV)/.installed
	$(VENV)/bin/scratchlm pull smollm2-135m-instruct
	echo "What is the capital of France?" | $(VENV)/bin/scratchlm chat smollm2-135m-instruct --temperature 0 --max-new-tokens 64
	@echo
	@echo "Next: $(VENV)/bin/scratchlm chat smollm2-135m-instruct    (interactive chat)"
	@echo "      $(VENV)/bin/scratchlm generate smollm2-135m-instruct 'Once upon a time'"
	@echo "      $(VENV)/bin/scratchlm --help"

test: $(VENV)/.dev
	@# The chat page tests drive Debian's chromium through Playwright (no browser download).
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(VENV)/bin/scratchlm pull smollm2-135m-instruct
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
