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
	$(PIP) install --quiet --no-deps --target $(LARK122) "lark==1.2.2"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	@echo "shapeflow: the training demo arrives with the runtime (issue 3)."
	@echo "Meanwhile, the spec toolchain:"
	$(VENV)/bin/shapeflow check specs/
	$(VENV)/bin/shapeflow graph specs/grpo.shape --format mermaid

bench: install
	$(PY) bench/check_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
