"""Shared helpers for the stage tests: small RolloutBatch builders and a registry-validated call."""

from __future__ import annotations

import os
from typing import Any, Sequence

# Tests parse thousands of throw-away specs: keep them out of the user's parse cache (the
# cache itself is tested with a cache folder of its own).
os.environ["SHAPEFLOW_PARSE_CACHE"] = "off"
os.environ["SHAPEFLOW_CHECK_CACHE"] = "off"  # tests check what the checker says now, not a stored answer

from shapeflow._lazy import torch  # imported on first use: test files without torch still collect
from shapeflow.runtime.batch import RolloutBatch
from shapeflow.stdlib.registry import default_registry


def make_batch(
    group_index: Sequence[int],
    mask: Any = None,
    *,
    T: int = 1,
    policy_logprobs: Any = None,
    **fields: Any,
) -> RolloutBatch:
    """A RolloutBatch with the given group of each response.

    ``mask`` is a nested list or tensor (B, T); none gives an all-ones (B, T) mask.
    ``policy_logprobs`` goes to ``extra["policy_logprobs"]`` (where the update phase keeps it);
    list values of tensor fields are turned into tensors (float64 when the mask is given as
    float64, else float32).
    """
    gi = torch.as_tensor(list(group_index), dtype=torch.long)
    if mask is None:
        mask = torch.ones(len(gi), T)
    mask = torch.as_tensor(mask, dtype=torch.float32) if not torch.is_tensor(mask) else mask
    extra = dict(fields.pop("extra", {}))
    if policy_logprobs is not None:
        extra["policy_logprobs"] = _tensor(policy_logprobs)
    for name in ("logprobs", "ref_logprobs", "entropy"):
        if name in fields and fields[name] is not None:
            fields[name] = _tensor(fields[name])
    return RolloutBatch(prompt_ids=[f"p{g}" for g in gi.tolist()], group_index=gi, mask=mask, extra=extra, **fields)


def _tensor(x: Any):
    return x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64)


def call(name: str, *inputs: Any, **params: Any) -> Any:
    """Call stage ``name`` as the executor does: parameters validated by its model, defaults filled."""
    st = default_registry()[name]
    state = params.pop("state", None)
    ctx = params.pop("ctx", None)
    values = st.params(**params).model_dump()
    if st.context and ctx is not None:  # a runtime-context stage given a (fake) step context
        values["ctx"] = ctx
    if st.stateful:  # a stateful stage: the given StageState (updated in place), else a fresh one
        from shapeflow.stdlib.state import StageState

        values["state"] = state if state is not None else StageState(dict(st.state), owner=name)
    return st.fn(*inputs, **values)


def stage_page_shows(name: str, texts, capsys) -> None:
    """`shapeflow stages NAME` exits 0 and its page contains every one of ``texts``."""
    from shapeflow.cli import main

    assert main(["stages", name]) == 0
    out = capsys.readouterr().out
    for text in texts:
        assert text in out, (text, out)


def spec_trainer(spec, *sets: str, setup: bool = True):
    """A CPU Trainer for ``spec`` (a file, or a name under specs/) with ``--set`` overrides (set
    up unless told not to)."""
    from pathlib import Path

    from shapeflow.compiler.pipeline import build_plan, compile_spec
    from shapeflow.runtime.trainer import Trainer

    specs = Path(__file__).resolve().parents[1] / "specs"
    path = Path(spec) if Path(spec).is_absolute() else specs / spec
    result = compile_spec(path, roots=[specs] if path.is_relative_to(specs) else [], sets=list(sets))
    assert result.ok, [f"{d.code} {d.message}" for d in result.diagnostics]
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    if setup:
        trainer.setup()
    return trainer
