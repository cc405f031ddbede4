"""Advantage shaping from recent papers (issue 5): regrouping, rank maps, reweighting, baselines.

Each stage is one small function over tensors, with its formula, paper and official-code
conventions in the docstring (see ../methods catalogs a and b). The worked examples in the
docstrings are the ones tests/test_shaping.py checks.

    g2rpo, g2rpo.group_ot, g2rpo.task_ot      G²RPO: rank → N(0,1) quantile map per group, then per task
    g2rpo.length_envelope, g2rpo.entropy_band G²RPO's trapezoid length score and task-level entropy band
    canon.entropy, canon.length               CANON: regroup by a metric, inter/intra group baselines
    adora, adora.weight                       ADORA: per-group reweighting by a length-advantage test
    negative_only                             GRPO-N / GSPO-N: keep only the negative advantages
    advevo_marl.role_baseline                 AdvEvo-MARL: a baseline shared by responses of one role

Shapes: B responses in G groups (``groups.group_index`` (B,)), T padded tokens (``groups.mask``
(B, T)). Group and task statistics are scatters over an index, never Python loops over
responses or groups. The only per-response Python pass reads a recorded *label* (a task type,
a role) from the batch: labels are strings, read once and numbered like ``group_index``.

Recorded labels. A stage keyed by a per-response label (G²RPO's task, AdvEvo-MARL's role)
reads it by field name: first from ``groups.extra[field]`` (a recorded-rollout line's
``extra.FIELD``, one value per response), else from the response's task example
(``example.meta[field]``: for ``tasks.jsonl`` the JSON record itself, so a ``problem_type``
column of the data file; a dotted name such as ``metadata.source_dataset`` walks nested
objects).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import (
    group_all_equal,
    group_count,
    group_mean_std,
    group_sum,
    to_tokens,
)
from shapeflow.stdlib.registry import NoParams, StageParams, stage

# --------------------------------------------------------------------------------------------
# shared helpers: recorded labels, the rank → normal-quantile map
# --------------------------------------------------------------------------------------------


def _meta_value(example: Any, field: str) -> Any:
    """``example.meta[field]`` (a dotted field walks nested dicts), or None."""
    value = getattr(example, "meta", None)
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _hashable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def recorded_labels(groups, field: str) -> list[Any] | None:
    """One label per response read from the batch (see the module doc), None where a
    response records none; None (not a list) when no response records ``field`` at all."""
    size = groups.size
    values: list[Any] = [None] * size
    extra = (groups.extra or {}).get(field)
    if extra is not None:
        seq = extra.tolist() if hasattr(extra, "tolist") else list(extra)
        if len(seq) != size:
            raise ValueError(f"extra.{field} holds {len(seq)} values for {size} responses")
        values = [_hashable(v) for v in seq]
    if groups.examples is not None:
        values = [v if v is not None else _hashable(_meta_value(ex, field)) for v, ex in zip(values, groups.examples)]
    return values if any(v is not None for v in values) else None


def _number(labels: list[Any], device) -> tuple["torch.Tensor", int]:
    """(B,) ids of ``labels`` numbered in order of first appearance, and their count."""
    seen: dict[Any, int] = {}
    ids = [seen.setdefault(v, len(seen)) for v in labels]
    return torch.tensor(ids, dtype=torch.long, device=device), len(seen)


def _pair_index(a: "torch.Tensor", b: "torch.Tensor") -> tuple["torch.Tensor", int]:
    """(B,) ids of the distinct pairs (a_i, b_i), and their count."""
    if a.numel() == 0:
        return a.clone(), 0
    key = a * (int(b.max()) + 1) + b
    uniq, inverse = torch.unique(key, return_inverse=True)
    return inverse, int(uniq.numel())


def normal_scores(x: "torch.Tensor", segment: "torch.Tensor", num_segments: int) -> "torch.Tensor":
    """The 1-D optimal-transport map of ``x`` onto N(0, 1), separately within each segment.

    Within a segment of N values sorted ascending, the r-th smallest gets the quantile
    q_r = √2 · erfinv(2·(r − 0.5)/N − 1) = Φ⁻¹((r − 0.5)/N); tied values all get the mean of
    the quantiles of their ranks; a segment of one value gets 0. Computed in float32 with the
    official ``compute_1d_ot``'s operations in its order (ranks, (r − 0.5)/N, erfinv, the tie
    sums accumulated in rank order), so the float32 rounding matches: the N quantiles of an
    all-equal segment do not sum to exactly 0 (N = 5 gives −2.3841858e-08 to each).

    One sort for all segments (stable by value, then stable by segment), ranks from each
    segment's start, tie runs found on the sorted values: no loop over segments.
    Example: x = [1, 0, 0, 0] in one segment → [1.1503, −0.3834, −0.3834, −0.3834].
    """
    x = x.to(torch.float32)
    size = x.numel()
    if size == 0:
        return x.clone()
    order = torch.argsort(x, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    xs, ss = x[order], segment[order]
    count = torch.bincount(segment, minlength=num_segments)
    start = torch.cumsum(count, 0) - count
    n = count[ss].to(torch.float32)
    rank = (torch.arange(size, device=x.device) - start[ss] + 1).to(torch.float32)
    q = math.sqrt(2.0) * torch.erfinv(2.0 * ((rank - 0.5) / n) - 1.0)
    new_run = torch.ones(size, dtype=torch.bool, device=x.device)
    new_run[1:] = (ss[1:] != ss[:-1]) | (xs[1:] != xs[:-1])
    run = torch.cumsum(new_run.to(torch.long), 0) - 1
    runs = int(run[-1]) + 1
    sums = torch.zeros(runs, dtype=torch.float32, device=x.device).scatter_add_(0, run, q)
    mean = sums / torch.bincount(run, minlength=runs).to(torch.float32)
    out = torch.empty_like(q)
    out[order] = mean[run]
    return out


# --------------------------------------------------------------------------------------------
# G²RPO (catalog A §7)
# --------------------------------------------------------------------------------------------

_G2RPO_PAPER = (
    "OpenVLThinkerV2 (G²RPO, Gaussian GRPO; UCLA NLP), arXiv:2604.08539; conventions of the official code "
    "uclanlp/OpenVLThinker commit 3d3707e5, EasyR1 verl/trainer/core_algos.py compute_1d_ot and "
    "compute_pertask_gaussian_outcome_advantage_grpo (catalog A §7)"
)
_FLAT_DOC = (
    "rerank: as the official code, an all-equal group (and a group of one) gets the float32 residue of "
    "stage 1 (≈ −2.4e-8 for 5 responses, 0 for one) and is re-ranked with the other groups of its task at "
    "stage 2, so it is not neutral; zero: the clean reading, such a group gets exactly 0 and is left out "
    "of its task's ranking (as if an online filter had dropped it)."
)
_TASK_DOC = (
    "The recorded label that names each response's task (the official data's problem_type; a "
    "'segmentation' task is split by a recorded data_type 'image'/'video', as the code does). Read from "
    "extra.FIELD of a recorded rollout or the example's record (tasks.jsonl); responses without it share "
    "the task 'default', as in the code. none: the whole batch is one task."
)


def _task_ids(groups, task_field: str | None, device) -> tuple["torch.Tensor", int]:
    """(B,) task id of every response and the number of tasks."""
    size = groups.size
    labels = recorded_labels(groups, task_field) if task_field is not None else None
    if labels is None:
        return torch.zeros(size, dtype=torch.long, device=device), 1 if size else 0
    keys = ["default" if v is None else str(v) for v in labels]
    if "segmentation" in keys:
        kinds = recorded_labels(groups, "data_type") or [None] * size
        keys = [
            f"segmentation/{str(d).lower()}" if k == "segmentation" and d is not None and str(d).lower() in
            ("image", "video") else k
            for k, d in zip(keys, kinds)
        ]
    return _number(keys, device)


def _no_spread(x: "torch.Tensor", index: "torch.Tensor", num: int) -> "torch.Tensor":
    """(B,) true for responses of a group that is all equal or has a single response."""
    single = group_count(index, num, x.dtype)[index] == 1
    return group_all_equal(x, index, num)[index] | single


def _group_stage(x: "torch.Tensor", segment: "torch.Tensor", num: int, flat_groups: str) -> "torch.Tensor":
    out = normal_scores(x, segment, num)
    if flat_groups == "zero":
        out = torch.where(group_all_equal(x, segment, num)[segment], torch.zeros_like(out), out)
    return out


def _task_stage(s: "torch.Tensor", tasks: "torch.Tensor", num_tasks: int,
                excluded: "torch.Tensor | None") -> "torch.Tensor":
    if excluded is None:
        return normal_scores(s, tasks, num_tasks)
    segment = torch.where(excluded, torch.full_like(tasks, num_tasks), tasks)  # the excluded: a bucket of their own
    out = normal_scores(s, segment, num_tasks + 1)
    return torch.where(excluded, torch.zeros_like(out), out)


class G2rpoParams(StageParams):
    task_field: str | None = Field("problem_type", min_length=1, description=_TASK_DOC)
    task_stage: bool = Field(
        True, description="Apply stage 2, the map over each task's responses (the official gs_grpo does); "
        "false stops after the per-group map (whether the paper's G²RPO has stage 2 could not be checked)."
    )
    flat_groups: Literal["rerank", "zero"] = Field("rerank", description=_FLAT_DOC)


@stage(
    "g2rpo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=G2rpoParams,
    paper=_G2RPO_PAPER,
)
def g2rpo(rewards, groups, *, task_field, task_stage, flat_groups):
    """Gaussian GRPO: ranks mapped to N(0, 1) quantiles within each group, then within each task.

        OT_S(x)_i = mean of Φ⁻¹((r − 0.5)/N) over the ranks r of x_i's value among the N values of S
        stage 1:  s_i = OT_g(r)_i          g = response i's prompt group (inside its task)
        stage 2:  A_i = OT_τ(s)_i          τ = response i's task: all its responses in the batch

    Φ⁻¹(u) = √2·erfinv(2u − 1); ties get the mean quantile of their ranks; a set of one value
    gets 0 (stage 2 of a one-response task too). Non-linear "distributional matching": every
    task's advantages are the N(0,1) quantiles of its ranks, mean 0 and the same spread
    whatever the reward scale. Computed in float32 as the official code (see
    ``g2rpo.group_ot`` for the rounding it keeps). The task comes from a recorded label
    (``task_field``, the official ``problem_type``); with none recorded the batch is one task.

    Corner case of the code (flat_groups = "rerank", the default): an all-equal group is not
    neutral. Stage 1 gives its responses a float32 residue (exactly 0 for 2–4 responses,
    −2.4e-8 for 5), stage 2 ranks that residue against the other groups' values: in a task
    with groups [1, 1, 0, 0, 0] and [0, 0, 0, 0, 0] the flat group gets +0.1349 each. The
    release avoids it with an online filter (keep groups with 0.01 < mean accuracy < 0.99).
    flat_groups = "zero" gives such groups (and one-response groups) exactly 0 and leaves them
    out of stage 2.

    Shapes: rewards (B,) → (B,); a loss broadcasts the advantage to the response's tokens.

    Example (catalog A §7): tasks math [1, 0, 0, 0 | 1, 1, 0, 1] and grounding IoU
    [0.9, 0.1, 0.5, 0.3 | 0.8, 0.7, 0.75, 0.2] (two prompts of four each) → math
    [1.5341, −0.5111, −0.5111, −0.5111, 0.5111, 0.5111, −1.5341, 0.5111], grounding
    [1.2106, −1.2106, 0.3230, −0.3230, 1.2106, −0.3230, 0.3230, −1.2106] (GRPO would give
    [1.5, −0.5, −0.5, −0.5] to the first group). Math [1, 0, 0, 0 | 0, 0, 0, 0] →
    [1.5341, −0.9700, −0.9700, −0.9700, 0.3440, 0.3440, 0.3440, 0.3440].
    """
    r = rewards.to(torch.float32)
    index, device = groups.group_index, r.device
    tasks, num_tasks = _task_ids(groups, task_field, device)
    segment, num = _pair_index(tasks, index)  # the prompt groups inside each task
    s = _group_stage(r, segment, num, flat_groups)
    if not task_stage:
        return s
    excluded = _no_spread(r, segment, num) if flat_groups == "zero" else None
    return _task_stage(s, tasks, num_tasks, excluded)


class GroupOtParams(StageParams):
    flat_groups: Literal["rerank", "zero"] = Field(
        "rerank", description="rerank: the official float32 residue for an all-equal group (≈ −2.4e-8 for 5 "
        "responses); zero: exactly 0."
    )


@stage(
    "g2rpo.group_ot",
    kind="signal",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=GroupOtParams,
    paper=_G2RPO_PAPER,
)
def group_ot(rewards, groups, *, flat_groups):
    """G²RPO's stage 1 on its own: each group's rewards mapped to N(0, 1) quantiles of their ranks.

        s_i = Φ⁻¹((r_i − 0.5)/N) averaged over tied ranks,   r_i = rank of response i in its group of N

    A Signal, so stage 1 can be applied to each reward component and summed before stage 2 —
    the official gs_gdpo: ``g2rpo.task_ot(g2rpo.group_ot(acc, groups) + g2rpo.group_ot(fmt,
    groups), groups)``. Computed in float32 with the official compute_1d_ot's operations, so
    an all-equal group gets the float32 residue of its quantiles' mean: 0 for 2–4 responses,
    −2.3841858e-08 for 5, −1.4901161e-08 for 8 (flat_groups = "zero" gives exactly 0). A group
    of one response gets 0.

    Shapes: rewards (B,) → (B,). Example: [1, 0, 0, 0] → [1.1503, −0.3834, −0.3834, −0.3834]
    (the three tied zeros share the mean of Φ⁻¹(1/8), Φ⁻¹(3/8), Φ⁻¹(5/8)).
    """
    r = rewards.to(torch.float32)
    return _group_stage(r, groups.group_index, groups.num_groups, flat_groups)


class TaskOtParams(StageParams):
    task_field: str | None = Field("problem_type", min_length=1, description=_TASK_DOC)
    flat_groups: Literal["rerank", "zero"] = Field(
        "rerank", description="rerank: every response takes part in its task's ranking (official); zero: a "
        "group whose input values are all equal, or that has one response, gets 0 and is left out."
    )


@stage(
    "g2rpo.task_ot",
    kind="advantage",
    inputs={"values": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=TaskOtParams,
    paper=_G2RPO_PAPER,
)
def task_ot(values, groups, *, task_field, flat_groups):
    """G²RPO's stage 2 on its own: all responses of a task mapped to N(0, 1) quantiles of their ranks.

        A_i = Φ⁻¹((r_i − 0.5)/N_τ) averaged over tied ranks,   r_i = rank of response i in its task τ

    The input is usually stage 1 (``g2rpo.group_ot``), or a sum of stage-1 maps of reward
    components (gs_gdpo). The task comes from a recorded label as in ``g2rpo``; a task of one
    response gets 0. Shapes: values (B,) → (B,). Example: stage-1 values [1.1503, −0.3834,
    −0.3834, −0.3834, 0, 0, 0, 0] in one task → [1.5341, −0.9700, −0.9700, −0.9700, 0.3440,
    0.3440, 0.3440, 0.3440].
    """
    s = values.to(torch.float32)
    tasks, num_tasks = _task_ids(groups, task_field, s.device)
    excluded = None
    if flat_groups == "zero":
        segment, num = _pair_index(tasks, groups.group_index)
        excluded = _no_spread(s, segment, num)
    return _task_stage(s, tasks, num_tasks, excluded)


class LengthEnvelopeParams(StageParams):
    min_start: float = Field(ge=0, description="a: below this length the score is 0 (per task in the paper; "
                             "not released, so required).")
    peak_start: float = Field(ge=0, description="b: the score rises linearly from a to 1 at b.")
    peak_end: float = Field(ge=0, description="c: the score stays 1 up to c.")
    max_end: float = Field(ge=0, description="d: the score falls linearly from 1 at c to 0 at d, and is 0 beyond.")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_start <= self.peak_start <= self.peak_end <= self.max_end:
            raise ValueError("the envelope needs min_start <= peak_start <= peak_end <= max_end")
        return self


@stage(
    "g2rpo.length_envelope",
    kind="reward",
    inputs={"lengths": "Signal[seq]"},
    output="Signal[seq]",
    params=LengthEnvelopeParams,
    paper=_G2RPO_PAPER + "; EasyR1 verl/reward_function/multitask_reward.py calculate_envelope_score",
)
def length_envelope(lengths, *, min_start, peak_start, peak_end, max_end):
    """G²RPO's response-length shaping: a trapezoid score of each response's length.

        l(L) = 0                      L < a  or  L > d
             = (L − a)/(b − a)        a ≤ L < b
             = 1                      b ≤ L ≤ c
             = 1 − (L − c)/(d − c)    c < L ≤ d

    (a, b, c, d) = (min_start, peak_start, peak_end, max_end), as the official
    ``calculate_envelope_score``. The intended reward is
    (1 − w_fmt − w_len)·accuracy + w_fmt·format + structure + w_len·l, written in a spec as
    ``reward r = 0.8 * correct + 0.1 * fmt + 0.1 * g2rpo.length_envelope(signals.length(groups),
    ...)``. In the release it is present but switched off (w_len = 0, l fixed to 0), and the
    per-task envelopes (and the "task length memory" that sets them) are not released, so the
    four bounds are required. The release measures L in characters of the response; any
    length signal works here (``signals.length`` counts tokens).

    Shapes: lengths (B,) → (B,). Example: (a, b, c, d) = (10, 20, 40, 50), lengths
    [5, 15, 30, 45, 55] → [0, 0.5, 1, 0.5, 0].
    """
    n = lengths.to(torch.float32)
    rise = (n - min_start) / max(peak_start - min_start, 1e-12)
    fall = 1.0 - (n - peak_end) / max(max_end - peak_end, 1e-12)
    out = torch.where(n < peak_start, rise, torch.where(n <= peak_end, torch.ones_like(n), fall))
    return torch.where((n < min_start) | (n > max_end), torch.zeros_like(n), out)


class EntropyBandParams(StageParams):
    h_low: float = Field(0.2, ge=0, description="H_low: an estimated task entropy below it is pulled up "
                         "(hard-coded 0.2 in the official compute_policy_loss).")
    h_high: float = Field(0.6, ge=0, description="H_high: an estimated task entropy above it is pulled down "
                          "(hard-coded 0.6).")
    coef: float = Field(0.02, ge=0, le=100, description="c, the weight of the band term in the loss "
                        "(hard-coded 0.02 in the official dp_actor.py: loss = pg + 0.02·reg).")
    agg: Literal["token", "seq"] = Field(
        "token", description="How a task's entropy estimate averages its tokens (EasyR1 loss_avg_mode): "
        "token: over all its valid tokens; seq: each response's token mean, then the mean over responses."
    )
    task_field: str | None = Field(
        "task_type", min_length=1, description="The recorded label naming each response's task (the official "
        "reward's task_type, one of six task families; read as g2rpo reads problem_type). Responses without "
        "it share the task 'default'; none: the whole micro-batch is one task."
    )

    @model_validator(mode="after")
    def _band(self):
        if self.h_low > self.h_high:
            raise ValueError("h_low must be at most h_high")
        return self


@stage(
    "g2rpo.entropy_band",
    kind="loss",
    inputs={"groups": "Rollouts"},
    output="Loss",
    params=EntropyBandParams,
    needs=("policy_logprobs",),
    phase="update",
    paper=_G2RPO_PAPER + "; compute_policy_loss (use_entropy_loss) and workers/actor/dp_actor.py",
)
def entropy_band(groups, *, h_low, h_high, coef, agg, task_field):
    """G²RPO's task-level entropy band: a penalty when a task's entropy leaves [H_low, H_high].

        Ĥ_τ   = mean over the tokens of task τ in the micro-batch of −log π_θ(y_t)
        reg_τ = ReLU(Ĥ_τ − H_high) if Ĥ_τ > H_high;  ReLU(H_low − Ĥ_τ) if Ĥ_τ < H_low;  else 0
        L     = c · Σ_τ reg_τ

    The entropy is estimated by the sampled tokens' negative log-probability under the current
    policy (not the full-vocabulary entropy), with gradient; "mean" is verl's masked mean
    Σ(−log π)·m / (Σm + 1e-8) (agg = "token") or the mean of the responses' token means
    (agg = "seq"). Add it to the objective: ``losses.ppo_clip(adv, groups) +
    g2rpo.entropy_band(groups)``. In the release the band is off (use_entropy_loss: false) and,
    when on, is added only when no KL loss is used. The official code loops over a fixed list of
    six task names and also adds ReLU(0.2 − 0) = 0.2 for each task absent from the micro-batch
    (its empty mean is 0): a constant without gradient, left out here, where only the tasks
    present count.

    Shapes: log-probs and mask (B, T); returns a scalar. Example (c = 0.02, one task):
    Ĥ = 0.1 → 0.0020; Ĥ = 0.4 → 0; Ĥ = 0.75 → 0.0030.
    """
    mask = groups.mask
    nll = -to_tokens(groups.need("policy_logprobs"), mask)  # (B, T), zero on padding
    tasks, num_tasks = _task_ids(groups, task_field, mask.device)
    tokens = mask.sum(-1).to(nll.dtype)  # (B,)
    row = nll.sum(-1)  # (B,)
    if agg == "token":
        estimate = group_sum(row, tasks, num_tasks) / (group_sum(tokens, tasks, num_tasks) + 1e-8)
    else:
        per_row = row / (tokens + 1e-8)
        estimate = group_sum(per_row, tasks, num_tasks) / group_count(tasks, num_tasks, nll.dtype).clamp(min=1)
    zero = torch.zeros_like(estimate)
    reg = torch.where(estimate > h_high, torch.relu(estimate - h_high),
                      torch.where(estimate < h_low, torch.relu(h_low - estimate), zero))
    return coef * reg.sum()


# --------------------------------------------------------------------------------------------
# CANON (catalog A §2)
# --------------------------------------------------------------------------------------------

_CANON_PAPER = (
    "CANON: Conditional Advantage Estimation, arXiv:2509.23962 (ICLR 2026); conventions of the official code "
    "biuboomc/CANON verl/trainer/ppo/core_algos.py compute_dr_entropy_per_token_group_outcome_advantage, "
    "compute_dr_length_on_mean_group_outcome_advantage and their _annel / _cosine_with_restart variants "
    "(catalog A §2)"
)
CANON_SCHEDULES = ("fixed", "annealed", "cosine_restart", "cosine_restart_r")


def cosine_annealing_with_restart(step: int, *, total_steps: int = 150, max_value: float = 1.0,
                                  min_value: float = 0.0, warmup_steps: int = 30, cycles: int = 3) -> float:
    """CANON's ``cosine_annealing_with_restart`` (a learning-rate-style schedule), as coded.

        f(t) = max · (t + 1)/warmup                                        t < warmup
        f(t) = min + ½(max − min)(1 + cos(π · (t' mod L)/L))               otherwise,
               t' = t − warmup,  L = ⌊(total − warmup)/cycles⌋

    It keeps cycling past ``total_steps`` (t' mod L). Example (total 150, warmup 30, 3 cycles,
    max 0.6, min 0): f(0) = 0.02, f(29) = 0.6, f(30) = 0.6, f(50) = 0.3, f(70) = 0.6 (restart).
    """
    if step < warmup_steps:
        return max_value * (step + 1) / warmup_steps
    length = (total_steps - warmup_steps) // cycles
    if length < 1:
        raise ValueError(f"total_steps − warmup_steps ({total_steps - warmup_steps}) must be at least "
                         f"cycles ({cycles})")
    t = (step - warmup_steps) % length
    return min_value + 0.5 * (max_value - min_value) * (1 + math.cos(math.pi * t / length))


def canon_schedule(schedule: str, *, step: int | None = None, mean_reward: float | None = None, mu: float = 1.0,
                   total_steps: int = 150, warmup_steps: int = 30, cycles: int = 3) -> float:
    """The weight w of CANON's inter-group term (the intra term gets 1 − w) under a schedule.

        fixed             w = mu                            (the code's _lambda; released 1.0)
        annealed          w = mean reward of the batch      (_annel, "first intra, later inter")
        cosine_restart    w = 1 − f(step), f with max 0.6, min 0
        cosine_restart_r  w = f(step),     f with max 1,   min 0.4

    f is ``cosine_annealing_with_restart`` (total 150, warmup 30, 3 cycles in the code). ``step``
    counts as verl's ``global_steps``: 1 on the first update. Examples: cosine_restart at steps
    1, 30, 50, 70 → 0.96, 0.4, 0.7, 0.4 (70 restarts the cycle); cosine_restart_r at step 50 →
    0.7; annealed with mean reward 0.25 → 0.25.
    """
    if schedule == "fixed":
        return float(mu)
    if schedule == "annealed":
        if mean_reward is None:
            raise ValueError("the annealed schedule needs the batch's mean reward")
        return float(mean_reward)
    if schedule not in ("cosine_restart", "cosine_restart_r"):
        raise ValueError(f"unknown CANON schedule {schedule!r} (one of {', '.join(CANON_SCHEDULES)})")
    if step is None:
        raise ValueError(f"the {schedule} schedule needs the training step")
    hi, lo = (0.6, 0.0) if schedule == "cosine_restart" else (1.0, 0.4)
    f = cosine_annealing_with_restart(step, total_steps=total_steps, max_value=hi, min_value=lo,
                                      warmup_steps=warmup_steps, cycles=cycles)
    return 1.0 - f if schedule == "cosine_restart" else f


class CanonParams(StageParams):
    mu: float = Field(1.0, ge=0, le=1, description="μ, the weight of the inter-group term (1 − μ on the intra "
                      "term); the code's _lambda, README 'Eq. 5'. Released scripts: 1.0 (pure inter-group); "
                      "0.5 with alpha 1 and beta 0 is Dr.GRPO (even group sizes). Used by schedule 'fixed'.")
    alpha: float = Field(1.0, ge=0, le=100, description="α, the code's alpha (README 'Eq. 8'; released 1.0). It "
                         "sits on a different term in the two variants (see the formula): a direction knob.")
    beta: float = Field(0.0, ge=-100, le=100, description="β, added to the high-metric side's inter term and "
                        "subtracted from the low side's (the code's function default 0, not exposed in its config).")
    normalizer: float = Field(1.0, gt=0, description="Z, every advantage is divided by it. The code uses the "
                              "maximum response length (8192) when the loss aggregation is seq-mean-token-sum, "
                              "else 1.")
    schedule: Literal["fixed", "annealed", "cosine_restart", "cosine_restart_r"] = Field(
        "fixed", description="The weight of the inter term: fixed (mu); annealed (the batch's mean reward, the "
        "code's _annel); cosine_restart (1 − cosine-with-restart, max 0.6 min 0); cosine_restart_r "
        "(cosine-with-restart, max 1 min 0.4). The cosine ones read the training step from the runtime. The "
        "code's scheduled variants have alpha 1 and beta 0."
    )
    total_steps: int = Field(150, ge=1, description="Cosine schedules: total_epochs of the code (150).")
    warmup_steps: int = Field(30, ge=0, description="Cosine schedules: linear warm-up steps (code 30).")
    cycles: int = Field(3, ge=1, description="Cosine schedules: restarts over total_steps − warmup_steps (code 3).")

    @model_validator(mode="after")
    def _cycle_length(self):
        if self.total_steps - self.warmup_steps < self.cycles:
            raise ValueError("total_steps − warmup_steps must be at least cycles (each cycle a step or more)")
        return self


def _canon(rewards, groups, metric, *, variant, mu, alpha, beta, normalizer, schedule, total_steps, warmup_steps,
           cycles, state):
    index, num = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)
    size = r.numel()
    if size == 0:
        return r.clone()
    mean_reward = r.mean() if schedule == "annealed" else None
    w = canon_schedule(schedule, step=int(state.step) + 1, mean_reward=mean_reward, mu=mu,
                       total_steps=total_steps, warmup_steps=warmup_steps, cycles=cycles)
    state["weight"] = float(w)
    # regroup: sort by metric (stable: ties keep batch order), then by group; the low half is the first ⌊n/2⌋
    order = torch.argsort(metric, stable=True)
    order = order[torch.argsort(index[order], stable=True)]
    count = torch.bincount(index, minlength=num)
    start = torch.cumsum(count, 0) - count
    rank = torch.empty_like(order)
    rank[order] = torch.arange(size, device=r.device) - start[index[order]]
    high = rank >= torch.div(count, 2, rounding_mode="floor")[index]  # (B,) C⁺: the high-metric side
    hi_f = high.to(torch.float32)
    n_hi, n_lo = group_sum(hi_f, index, num), group_sum(1.0 - hi_f, index, num)
    s_hi, s_lo = group_sum(r * hi_f, index, num), group_sum(r * (1.0 - hi_f), index, num)
    zero = torch.zeros_like(n_hi)
    several = count > 1  # a one-response group: μ⁻ = μ⁺ = 0, as the code
    mu_hi = torch.where(several, s_hi / n_hi.clamp(min=1), zero)[index]  # μ⁺
    mu_lo = torch.where(several, s_lo / n_lo.clamp(min=1), zero)[index]  # μ⁻
    if variant == "entropy":
        inter = torch.where(high, r - alpha * mu_lo + beta, alpha * r - mu_hi - beta)
    else:
        inter = torch.where(high, alpha * r - mu_lo + beta, r - alpha * mu_hi - beta)
    intra = torch.where(high, r - mu_hi, r - mu_lo)
    return (w * inter + (1 - w) * intra) / normalizer


_CANON_DOC_COMMON = """
    Regrouping (official code): within each prompt group of n responses, sort by the metric m
    ascending — a stable sort, so ties keep batch order — and split at h = ⌊n/2⌋: C⁻ = the
    first h (low metric), C⁺ = the other n − h (high; with n = 5 the split is 2 low, 3 high).
    μ⁻, μ⁺ are the mean rewards of C⁻, C⁺. Then

        A_o = [ w·A_inter + (1 − w)·A_intra ] / Z,   A_intra = R_o − μ(own side)

    with w = mu (schedule "fixed"; see ``canon_schedule`` for the others) and Z = normalizer.
    μ = 0.5, α = 1, β = 0 gives Dr.GRPO (R − mean)/Z when n is even (halves of equal size).
    Corner cases, as coded: an all-equal group
    is 0 only when α = 1 and β = 0 (else α and β shift it); a group of one response is not 0:
    it counts as C⁺ with μ⁻ = μ⁺ = 0. The cosine schedules read the step from the stage state
    (0-based in shapeflow; step + 1 is verl's global_steps; replay takes it from each line's
    `step`), and the weight w in use is logged as ``state/<binding>/weight``.
    Shapes: rewards (B,) → (B,).
"""


@stage(
    "canon.entropy",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts", "entropy": "Signal[tok]"},
    output="Advantage[seq]",
    params=CanonParams,
    paper=_CANON_PAPER,
    state={"weight": "w, the weight of the inter-group term at the last step (from the schedule)"},
)
def canon_entropy(rewards, groups, entropy, *, mu, alpha, beta, normalizer, schedule, total_steps, warmup_steps,
                  cycles, state):
    """CANON by entropy: responses regrouped by mean token entropy, judged against the other half.

        m_i = Σ_t H_{i,t} m_{i,t} / (Σ_t m_{i,t} + 1e-8)        (verl masked_mean; 0 for an empty response)
        o ∈ C⁺ (high entropy):  A_inter = R_o − α·μ⁻ + β
        o ∈ C⁻ (low entropy):   A_inter = α·R_o − μ⁺ − β

    α > 1 favours low-entropy responses. The entropy is the behaviour policy's full-vocabulary
    token entropy (``signals.entropy(groups)``); a per-response signal is used as it is.
    The official one-response group: A = (R + μβ)/Z.
    {common}
    Example (G = 6, Z = 1): R = [1, 0, 1, 1, 0, 0], m = [0.9, 0.2, 0.8, 0.1, 0.7, 0.3] →
    C⁻ = {3, 1, 5} (μ⁻ = 1/3), C⁺ = {4, 2, 0} (μ⁺ = 2/3). μ = 1: [0.6667, −0.6667, 0.6667,
    0.3333, −0.3333, −0.6667]; μ = 0.5: [0.5, −0.5, 0.5, 0.5, −0.5, −0.5] (Dr.GRPO); μ = 0:
    [0.3333, −0.3333, 0.3333, 0.6667, −0.6667, −0.3333]; μ = 1, α = 1.2: [0.6, −0.6667, 0.6,
    0.5333, −0.4, −0.6667]. With Z = 8192 the first row's 0.6667 becomes 8.14e-05.
    """
    mask = groups.mask
    h = entropy.to(torch.float32)
    if h.dim() == 2:
        h = to_tokens(h, mask).sum(-1) / (mask.sum(-1).to(torch.float32) + 1e-8)
    return _canon(rewards, groups, h, variant="entropy", mu=mu, alpha=alpha, beta=beta, normalizer=normalizer,
                  schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps, cycles=cycles, state=state)


@stage(
    "canon.length",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts", "lengths": "Signal[seq]"},
    output="Advantage[seq]",
    params=CanonParams,
    paper=_CANON_PAPER,
    state={"weight": "w, the weight of the inter-group term at the last step (from the schedule)"},
)
def canon_length(rewards, groups, lengths, *, mu, alpha, beta, normalizer, schedule, total_steps, warmup_steps,
                 cycles, state):
    """CANON by length: responses regrouped by length, judged against the other half.

        m_i = |o_i|   (``signals.length(groups)``)
        o ∈ C⁺ (long):   A_inter = α·R_o − μ⁻ + β
        o ∈ C⁻ (short):  A_inter = R_o − α·μ⁺ − β

    α sits on the other terms than in ``canon.entropy``: α > 1 favours long responses. The
    official one-response group: A = (μαR + (1 − μ)R + μβ)/Z.
    {common}
    Example (Z = 1, μ = 1, α = 1.2): R = [1, 0, 1, 1, 0, 0], lengths [6, 3, 5, 2, 8, 4] →
    [0.8667, −0.8, 0.8667, 0.2, −0.3333, −0.8].
    """
    m = lengths.to(torch.float32)
    return _canon(rewards, groups, m, variant="length", mu=mu, alpha=alpha, beta=beta, normalizer=normalizer,
                  schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps, cycles=cycles, state=state)


canon_entropy.__doc__ = canon_entropy.__doc__.replace("{common}", _CANON_DOC_COMMON)
canon_length.__doc__ = canon_length.__doc__.replace("{common}", _CANON_DOC_COMMON)


# --------------------------------------------------------------------------------------------
# ADORA (catalog A §8)
# --------------------------------------------------------------------------------------------

_ADORA_PAPER = (
    "ADORA: Advantage Dynamics via Online Rollout Adaptation, arXiv:2602.10019 (blog Mar 2025); conventions "
    "of the official blog-era code ShadeCloak/ADORA: ADORA/verl/trainer/ppo/core_algos.py "
    "compute_grpo_outcome_advantage_ADORA (LLM) and ADORA_VL/openrlhf/trainer/ppo_utils/"
    "experience_maker_vl.py weight_func (VLM) (catalog A §8)"
)


class AdoraWeightParams(StageParams):
    correct_above: float = Field(
        description="c: a response is correct when its reward is > c. The LLM release uses 1.01 on Logic-RL's "
        "score scale (a correct answer scores about 3); the VLM release 0.5. Required: it depends on the "
        "reward's scale (0.5 for 0/1 rewards)."
    )
    max_length: int | None = Field(
        None, ge=1, description="L_max: wrong responses of this length or longer are left out of the mean wrong "
        "length (truncated ones, typically). none: the release's own, 4054 (LLM function default; ADORA.sh "
        "passes 3900) or 4094 (VLM)."
    )
    lam: float = Field(0.1, ge=0, le=10, description="λ, the weight of a group without a length advantage "
                       "(0.1 in both releases; adora_lamda).")
    convention: Literal["llm", "vlm"] = Field(
        "llm", description="Empty sets, as each release codes them. llm: no correct response → λ, no counted "
        "wrong one → 1; vlm: no correct response → 1, no counted wrong one → λ."
    )


def _adora_weight(rewards, groups, lengths, *, correct_above, max_length, lam, convention):
    index, num = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)
    n = lengths.to(torch.float32)
    if max_length is None:
        max_length = 4054 if convention == "llm" else 4094
    correct = r > correct_above
    wrong = (~correct) & (n < max_length)
    ninf = torch.full((num,), -float("inf"), device=r.device)
    longest_correct = ninf.scatter_reduce(0, index, torch.where(correct, n, -float("inf")), "amax", include_self=True)
    wrong_f = wrong.to(torch.float32)
    n_wrong = group_sum(wrong_f, index, num)
    empty = -float("inf") if convention == "llm" else float("inf")
    mean_wrong = torch.where(n_wrong > 0, group_sum(n * wrong_f, index, num) / n_wrong.clamp(min=1),
                             torch.full_like(n_wrong, empty))
    advantaged = longest_correct > mean_wrong
    if convention == "vlm":
        advantaged = advantaged | (group_sum(correct.to(torch.float32), index, num) == 0)
    one = torch.ones_like(n_wrong)
    return torch.where(advantaged, one, one * lam)[index]


@stage(
    "adora.weight",
    kind="signal",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts", "lengths": "Signal[seq]"},
    output="Signal[seq]",
    params=AdoraWeightParams,
    paper=_ADORA_PAPER,
)
def adora_weight(rewards, groups, lengths, *, correct_above, max_length, lam, convention):
    """ADORA's per-group weight: 1 where the group's correct responses show a length advantage, else λ.

        P_g = {i : R_i > c},   N_g = {i : R_i ≤ c, |o_i| < L_max}
        TAS(g) = [ max_{i∈P_g} |o_i| > mean_{i∈N_g} |o_i| ],    w_g = 1 if TAS(g) else λ

    Empty sets as each release codes them: convention "llm" takes max over an empty P and mean
    over an empty N as −∞ (an all-wrong group gets λ, a group with correct responses and no
    counted wrong one gets 1); "vlm" takes the mean over an empty N as +∞ and gives weight 1 to
    a group without a correct response (an all-correct group gets λ). The length threshold can
    flip a verdict: a long wrong response left out of N lowers its mean.

    A Signal, to weight any estimator's advantage (the VLM release weights RLOO and
    REINFORCE-baseline too): ``rloo(r, groups) * adora.weight(r, groups, signals.length(groups),
    correct_above = 0.5)``. Shapes: rewards, lengths (B,) → (B,).

    Example (VLM, c = 0.5): rewards [1, 0, 1, 0 | 1, 0, 0, 1 | 0, 0, 0, 0] with lengths
    [1200, 800, 900, 700 | 400, 900, 1000, 500 | any] → weights 1.0, 0.1, 1.0 per group.
    """
    return _adora_weight(rewards, groups, lengths, correct_above=correct_above, max_length=max_length, lam=lam,
                         convention=convention)


class AdoraParams(AdoraWeightParams):
    eps: float = Field(1e-6, ge=0, le=1, description="Added to the group's std before dividing (LLM release 1e-6; "
                       "the VLM release's OpenRLHF group_norm uses 1e-9).")


@stage(
    "adora",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts", "lengths": "Signal[seq]"},
    output="Advantage[seq]",
    params=AdoraParams,
    paper=_ADORA_PAPER,
)
def adora(rewards, groups, lengths, *, correct_above, max_length, lam, convention, eps):
    """ADORA (length criterion): the GRPO advantage, scaled by λ in groups without a length advantage.

        A_i  = (R_i − μ_g) / (σ_g + eps)          σ_g the group's sample (n − 1) std
        A'_i = w_g · A_i                          w_g from ``adora.weight``: 1 if TAS(g), else λ

    TAS(g): the longest correct response of the group is longer than the mean length of its
    wrong ones (those shorter than L_max) — "temporarily advantageous samples". Conventions of
    the LLM release (convention = "llm"): a group of one response keeps its raw score (no
    normalisation: A = w·R, not verl's R/(1 + eps)), an all-wrong group gets weight λ. A group of
    two or more equal rewards gets exactly 0 (the code divides a rounding residue by eps
    there). The 2026 paper's "difficulty advantage" criterion and its amplification factor are
    not in the released code and not implemented (only its abstract could be read).

    Shapes: rewards, lengths (B,) → (B,). Example (c = 1.01, λ = 0.1): scores [3, −0.5, 3, −0.5]
    with lengths [1200, 800, 900, 700] (1200 > 750: weight 1) → [0.8660, −0.8660, 0.8660,
    −0.8660]; [3, −0.5, −0.5, 3] with lengths [400, 900, 1000, 500] (500 < 950: weight 0.1) →
    [0.0866, −0.0866, −0.0866, 0.0866].
    """
    index, num = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)
    mean, sigma, count = group_mean_std(r, index, num, unbiased=True)
    single = count[index] == 1
    centred = torch.where(single, r, (r - mean[index]) / torch.where(single, torch.ones_like(r), sigma[index] + eps))
    centred = torch.where(group_all_equal(r, index, num)[index], torch.zeros_like(r), centred)
    weight = _adora_weight(r, groups, lengths, correct_above=correct_above, max_length=max_length, lam=lam,
                           convention=convention)
    return weight * centred


# --------------------------------------------------------------------------------------------
# GRPO-N (catalog B §3, methods section)
# --------------------------------------------------------------------------------------------


@stage(
    "negative_only",
    kind="advantage",
    inputs={"advantages": "Advantage[*]"},
    output="Advantage[*]",
    params=NoParams,
    paper="Yao et al., The Debate on RLVR Reasoning Capability Boundary: Shrinkage, Expansion, or Both?, "
    "arXiv:2510.04028 (GRPO-N / GSPO-N; no official code found; catalog B §3)",
)
def negative_only(advantages):
    """GRPO-N / GSPO-N: only the relative negative gradients — every positive advantage set to 0.

        A^N = min(A, 0)

    per response (or per token for a token-level advantage); padding stays 0. Composes with any
    group estimator: ``grpo(r, groups) |> negative_only()`` is GRPO-N, the same advantage fed to
    ``losses.gspo`` is GSPO-N; the loss is unchanged. "Relative" keeps the group-normalised
    magnitude: with binary rewards in a group of success rate p, a wrong response gets −p/σ
    (unlike NSR, which trains on −1 without normalisation).

    Reconstructed from the paper's description (its abstract and public reviews; no paper body
    or code could be read): "negative" is read as A < 0, not a reward threshold; a KL or entropy
    term, if any, is a separate loss and stays on every response.

    Example: GRPO [0.866, −0.866, −0.866, 0.866, −0.511, 1.277, −1.022, 0.255] →
    [0, −0.866, −0.866, 0, −0.511, 0, −1.022, 0].
    """
    return torch.where(advantages < 0, advantages, torch.zeros_like(advantages))


# --------------------------------------------------------------------------------------------
# AdvEvo-MARL public baseline (catalog A §12, catalog C §8)
# --------------------------------------------------------------------------------------------


class RoleBaselineParams(StageParams):
    role_field: str = Field(
        "role", min_length=1, description="The recorded label naming each response's functional group (its "
        "agent role, e.g. attacker / defender): extra.FIELD of a recorded rollout, or the example's record."
    )
    scope: Literal["group", "batch"] = Field(
        "group", description="Where the baseline is shared: group: responses of one role within one rollout "
        "group (the runtime should give every agent turn of an episode the same group); batch: all responses "
        "of the role in the batch. Unknown in the paper."
    )
    leave_one_out: bool = Field(False, description="Exclude the response's own return from its baseline "
                                "(unknown in the paper; off).")
    norm_by_std: bool = Field(False, description="Divide by the shared set's sample std + eps (unknown in the "
                              "paper, which names only a mean-return baseline; off).")
    eps: float = Field(1e-6, ge=0, le=1, description="Added to the std when norm_by_std.")
    missing_role: Literal["error", "shared"] = Field(
        "error", description="A response that records no role: error stops with a message naming the field; "
        "shared puts all such responses in one role (for single-agent data this is the group-mean baseline)."
    )


@stage(
    "advevo_marl.role_baseline",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=RoleBaselineParams,
    paper="Pan, Zhang, Liu et al., AdvEvo-MARL: Shaping Internalized Safety through Adversarial Co-Evolution "
    "in Multi-Agent Reinforcement Learning, arXiv:2510.01586 (the 'public baseline'; no official code; "
    "catalog A §12, catalog C §8)",
)
def role_baseline(rewards, groups, *, role_field, scope, leave_one_out, norm_by_std, eps, missing_role):
    """AdvEvo-MARL's public baseline: agents of one functional group share a mean-return baseline.

        b_F = mean_{a' ∈ F} R_{a'},     A_a = R_a − b_F         (÷ (σ_F + eps) with norm_by_std)

    F is the set of responses with agent a's role (``role_field``) in the same rollout group
    (scope = "group") or in the whole batch (scope = "batch"); leave_one_out uses the mean of
    the others, n/(n − 1)·(R_a − b_F). Reconstructed from the paper's description: only the
    abstract could be read ("agents within the same functional group share a group-level
    mean-return baseline, enabling lower-variance updates"); the scope of the mean, leave-one-out
    and any std normalisation are unknown, and are parameters here. A set of one response, and a
    set whose returns are all equal, get 0. The role must be recorded with each response (a
    multi-agent rollout's agent role); no built-in rollout records one yet.

    Shapes: rewards (B,) → (B,). Example (one episode): defenders [1, 0, 1] → b = 0.6667 →
    [0.3333, −0.6667, 0.3333]; attackers [0, 1] → b = 0.5 → [−0.5, 0.5].
    """
    r = rewards.to(torch.float32)
    labels = recorded_labels(groups, role_field)
    missing = labels is None or any(v is None for v in labels)
    if missing and missing_role == "error":
        raise ValueError(
            f"advevo_marl.role_baseline: {'no' if labels is None else 'some'} response records a role "
            f"'{role_field}' (looked for extra.{role_field} and the task example's field '{role_field}'); "
            "record the agent role with each response, or set missing_role = \"shared\""
        )
    roles, _ = _number(labels if labels is not None else [None] * r.numel(), r.device)
    scope_index = groups.group_index if scope == "group" else torch.zeros_like(groups.group_index)
    index, num = _pair_index(scope_index, roles)
    if num == 0:
        return r.clone()
    mean, sigma, count = group_mean_std(r, index, num, unbiased=True)
    n = count[index]
    zero = torch.zeros_like(r)
    centred = r - mean[index]
    if leave_one_out:
        centred = centred * n / (n - 1).clamp(min=1)
    if norm_by_std:
        centred = centred / torch.where(n > 1, sigma[index], torch.ones_like(r)).add(eps)
    return torch.where((n == 1) | group_all_equal(r, index, num)[index], zero, centred)
