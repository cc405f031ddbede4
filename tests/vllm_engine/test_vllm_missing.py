"""Selecting the vLLM engine where vLLM is not installed: the spec checks, and the run stops with a
message saying how to build the vLLM environment. Runs in both environments (vLLM hidden here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


def test_the_vllm_engine_is_registered_without_importing_vllm():
    from shapeflow.runtime.engine import ENGINES

    assert "vllm" in ENGINES and ENGINES["vllm"].__name__ == "VllmEngine"


def test_selecting_vllm_without_vllm_says_how_to_build_it(monkeypatch):
    from shapeflow.compiler.pipeline import build_plan, compile_spec
    from shapeflow.runtime.trainer import RunError, Trainer
    from shapeflow.stdlib.registry import default_registry

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    result = compile_spec(ROOT / "specs" / "grpo_tis.shape", sets=["groups.engine=vllm", "train.prompts_per_step=2"])
    assert result.ok, [str(d) for d in result.diagnostics]  # the spec is fine: only the run needs vLLM
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    with pytest.raises(RunError, match=r"make vllm.*\.venv-vllm/bin/shapeflow run"):
        trainer.engine("vllm", trainer.policy)
