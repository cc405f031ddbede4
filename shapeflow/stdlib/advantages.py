"""Advantage estimators: turn a reward Signal into the Advantage a loss consumes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import group_all_equal, group_mean_std
from shapeflow.stdlib.registry import StageParams, stage


class GrpoParams(StageParams):
    norm_by_std: bool = Field(
        True, description="Divide by the std (GRPO); false gives r − mean (Dr.GRPO; verl norm_adv_by_std_in_grpo)."
    )
    eps: float = Field(
        1e-6, ge=0, le=1, description="Added to the std before dividing: 1e-6 verl, 1e-4 TRL, 1e-9 OpenRLHF, 1e-8 oat."
    )
    std: Literal["sample", "population"] = Field(
        "sample", description="sample: Bessel-corrected (N−1, torch.std; verl and TRL); population: N."
    )
    scope: Literal["group", "batch"] = Field(
        "group", description="Where the std comes from: each group's own (verl, TRL 'group') or the whole "
        "batch's (TRL scale_rewards='batch', LitePPO). The mean is always the group's."
    )


@stage(
    "grpo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=GrpoParams,
    paper="Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300; conventions of verl "
    "compute_grpo_outcome_advantage and TRL GRPOTrainer (catalog B1)",
)
def grpo(rewards, groups, *, norm_by_std, eps, std, scope):
    """Group-relative advantage: each reward against its group's mean, scaled by a std.

        A_i = (r_i − μ_g) / (σ + eps)      norm_by_std = true
        A_i =  r_i − μ_g                   norm_by_std = false

    μ_g is the mean of the rewards of response i's group g; σ is the group's std (scope =
    "group") or the std of all rewards of the batch (scope = "batch"), sample or population.
    A group of one response uses μ = 0 and σ = 1, as verl does (in both scopes). A group of two
    or more responses whose rewards are all equal gets exactly A = 0 for every response. The
    advantage is per sequence; a loss broadcasts it to every token of the response.

    Example (verl defaults): rewards [1, 0, 0, 1] in one group → [0.866, −0.866, −0.866, 0.866];
    [0.2, 0.9, 0, 0.5] → [−0.511, 1.277, −1.022, 0.255].
    """
    index, num_groups = groups.group_index, groups.num_groups
    rewards = rewards.to(torch.float32)  # (B,)
    unbiased = std == "sample"
    mean, sigma, count = group_mean_std(rewards, index, num_groups, unbiased=unbiased)
    singleton = (count == 1)[index]  # (B,)
    # all-equal groups are found exactly (min == max): a rounded mean can leave r − μ a few ulps
    # off zero, which σ + eps (σ ≈ 0) would blow up instead of giving A = 0
    flat = group_all_equal(rewards, index, num_groups)[index]  # (B,)
    zero = torch.zeros_like(rewards)
    centred = torch.where(flat, zero, torch.where(singleton, rewards, rewards - mean[index]))  # (B,)
    if not norm_by_std:
        return centred
    if scope == "batch":
        batch_sigma = rewards.std(correction=int(unbiased)) if rewards.numel() > 1 else rewards.new_ones(())
        sigma_i = batch_sigma.expand_as(rewards)
    else:
        sigma_i = sigma[index]
    sigma_i = torch.where(singleton, torch.ones_like(sigma_i), sigma_i)
    return torch.where(flat, zero, centred / (sigma_i + eps))
