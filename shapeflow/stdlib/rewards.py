"""Reward stages that read rewards computed elsewhere."""

from __future__ import annotations

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.runtime.batch import MissingNeed
from shapeflow.stdlib.registry import StageParams, stage


class RecordedParams(StageParams):
    key: str = Field(min_length=1, description="Name of the score in each response's `scores` object.")


@stage(
    "rewards.recorded",
    kind="reward",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=RecordedParams,
    needs=("scores",),
)
def recorded(groups, *, key):
    """A score recorded with each response, read by name: r_i = scores_i[key].

    The way to reuse a reward model's or another trainer's scores (recorded rollouts, or a
    task's own scorer). Example: scores [{"acc": 1}, {"acc": 0.5}] with key "acc" give [1, 0.5].
    """
    scores = groups.need("scores")
    if key not in scores:
        known = ", ".join(sorted(scores)) or "none"
        raise MissingNeed(f"no recorded score '{key}' (recorded scores: {known})")
    return scores[key].to(torch.float32)
