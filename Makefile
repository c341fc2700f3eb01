# Two set-up commands: `make run` and `make test`. Both work on a fresh clone of a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first and pinned: this machine has that CPU wheel on disk; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: run chat-demo test install dev lint clean

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

# The main job: train a small GPT on the bundled Shakespeare (nanoGPT's CPU recipe, ~1-2 minutes on 2 cores),
# with a progress bar, samples at each evaluation, metrics.jsonl and loss.png in runs/shakespeare-char/.
run: $(VENV)/.installed
	$(VENV)/bin/scratchlm train --preset shakespeare-char --out runs/shakespeare-char --force
	@echo
	@echo "Your model: runs/shakespeare-char/best   curves: runs/shakespeare-char/loss.png"
	@echo "Next:"
	@echo "  $(VENV)/bin/scratchlm generate runs/shakespeare-char/best 'Romeo.' --temperature 0.8   # your model writes"
	@echo "  $(VENV)/bin/scratchlm train --preset shakespeare-bpe          # the same model on a BPE vocabulary"
	@echo "  $(VENV)/bin/scratchlm pull smollm2-135m-instruct              # a real pretrained model (~94 MiB)"
	@echo "  $(VENV)/bin/scratchlm chat smollm2-135m-instruct              # chat with it"
	@echo "  $(VENV)/bin/scratchlm serve smollm2-135m-instruct             # OpenAI-compatible server + web chat"

# The former `make run`: pull SmolLM2-135M-Instruct and ask it one question.
chat-demo: $(VENV)/.installed
	$(VENV)/bin/scratchlm pull smollm2-135m-instruct
	echo "What is the capital of France?" | $(VENV)/bin/scratchlm chat smollm2-135m-instruct --temperature 0 --max-new-tokens 64

test: $(VENV)/.dev
	@# The chat page tests drive Debian's chromium through Playwright (no browser download).
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(VENV)/bin/scratchlm pull smollm2-135m-instruct
	$(VENV)/bin/scratchlm pull all-minilm-l6-v2
	$(PY) -m pytest -q

# The course (notebooks/, docs/course.md) in JupyterLab, from the dev extras.
.PHONY: notebooks
notebooks: $(VENV)/.dev
	$(VENV)/bin/jupyter lab notebooks/

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
