"""A verifier that scores each response with its task's own scorer."""

from __future__ import annotations

import math

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.needs import MissingNeed
from shapeflow.stdlib.registry import StageParams, stage


class TaskScoreParams(StageParams):
    threshold: float | None = Field(
        None, ge=0, le=1,
        description="none passes each score through (partial credit in [0, 1]); a number gives 1.0 "
        "where the score reaches it, else 0.0.",
    )


@stage(
    "verifiers.task_score",
    kind="verify",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=TaskScoreParams,
    needs=("response",),
)
def task_score(groups, *, threshold):
    """Each response scored by its task's own scorer: v_i = scorer(example_i, y_i).

        v_i = s_i                        (threshold = none)
        v_i = 1[ s_i >= threshold ]      (otherwise)

    The scorer comes with the dataset (``tasks.countdown`` checks the expression,
    ``tasks.reasoning_gym`` uses the dataset's ``score_answer``); a task without one is
    scored by exact match of the stripped response against the stripped answer. A score
    that is not a finite number counts as 0.0. Example: countdown "Use 4 9 3 to make 39:"
    with responses ["3*(9+4)", "(4+9)*3", "39", "4*9+3"] gives [1, 1, 0, 1].
    """
    examples, task = groups.examples, groups.task
    if examples is None or task is None:
        raise MissingNeed("the rollouts carry no task examples (verifiers.task_score needs the runtime's rollouts)")
    responses = groups.need("response")
    scorer = getattr(task, "scorer", None)
    values = []
    for example, response in zip(examples, responses):
        if scorer is None:
            value = float(response.strip() == example.answer.strip())
        else:
            value = float(scorer(example, response))
            value = value if math.isfinite(value) else 0.0
        values.append(value if threshold is None else float(value >= threshold))
    return torch.tensor(values, dtype=torch.float32, device=groups.device)
