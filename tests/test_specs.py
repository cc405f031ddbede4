"""Every spec in specs/ checks clean and trains a few steps on the embedded task without NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from shapeflow.compiler.pipeline import build_plan, compile_spec
from shapeflow.runtime.trainer import Trainer
from shapeflow.stdlib.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
# Specs on the builtin tiny model; the SmolLM2 one has its own (slow) runtime test.
SPECS = sorted(p for p in (ROOT / "specs").rglob("*.shape") if "smollm2" not in p.name)


@pytest.mark.parametrize("spec", SPECS, ids=[str(p.relative_to(ROOT / "specs")) for p in SPECS])
def test_spec_trains_a_few_steps(spec):
    result = compile_spec(spec, roots=[ROOT / "specs"], sets=["train.prompts_per_step=4", "train.eval_size=8"])
    assert result.ok, [f"{d.code} {d.message}" for d in result.diagnostics]
    assert "cite" in result.program.header, "every spec cites its paper"
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    for step in range(2):
        metrics = trainer.train_step(step)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, bad
    objective = result.program.nodes[result.program.objective].binding
    assert math.isfinite(metrics[f"objective/{objective}"])
