"""Advantage estimators: turn a reward Signal into the Advantage a loss consumes.

Shapes: B responses in G groups (``groups.group_index`` (B,)), T padded tokens
(``groups.mask`` (B, T), 1 on response tokens). A sequence value is (B,), a token value (B, T)
and zero on padding. Group statistics are scatters over the group index, never Python loops.
Rewards are cast to float32 (as verl computes them); the worked examples in the docstrings are
the ones tests/test_advantages.py checks.

Conventions shared by the group estimators (each stage's doc says where it differs):

* a group of one response ("singleton") follows verl: its baseline is 0 (and its std 1), so
  it keeps its reward;
* a group of two or more responses whose rewards are all equal ("flat", compared exactly
  with min == max) gets exactly A = 0 — never a rounding residue divided by a tiny std.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import (
    discounted_returns,
    group_loo_std,
    group_stats,
    group_std,
    group_sum,
    masked_whiten,
    masked_whiten_rows,
    no_holes,
    place_at_last_token,
)
from shapeflow.stdlib.registry import StageParams, stage

_STD_DOC = "sample: Bessel-corrected (N−1, torch.std; verl and TRL); population: N."


# --------------------------------------------------------------------------------------------
# the group-relative core shared by grpo and group_normalize
# --------------------------------------------------------------------------------------------


def _group_relative(rewards, groups, *, norm_by_std, eps, std, scope, baseline):
    """(r − b) / (σ + eps) per response, b the group mean or the mean of the others."""
    index, num_groups = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)  # (B,)
    unbiased = std == "sample"
    stats = group_stats(r, index, num_groups)
    if baseline == "leave_one_out":
        return _leave_one_out(r, index, stats, norm_by_std=norm_by_std, eps=eps, unbiased=unbiased, scope=scope)
    # all-equal groups are found exactly (min == max): a rounded mean can leave r − μ a few ulps
    # off zero, which σ + eps (σ ≈ 0) would blow up instead of giving A = 0; so the centre of a
    # flat group is its common value, and its scale 0 (exactly 0 even with eps = 0)
    centre = stats.centre()  # (G,): μ_g, 0 for a singleton (verl)
    if not norm_by_std:
        return r - centre[index]
    if scope == "batch":
        sigma = (r.std(correction=int(unbiased)) if r.numel() > 1 else r.new_ones(())).expand(num_groups)
    else:
        sigma = group_std(r, index, num_groups, stats.mean, stats.count, unbiased=unbiased)  # (G,)
    denom = torch.where(stats.one, 1.0, sigma) + eps  # (G,); a singleton: σ = 1 (verl)
    if eps == 0:  # a flat group's r − centre is exactly 0: keep 0/σ from being 0/0 there
        denom = torch.where(stats.flat, 1.0, denom)
    return (r - centre[index]) / denom[index]


def _leave_one_out(r, index, stats, *, norm_by_std, eps, unbiased, scope):
    """grpo's leave-one-out baseline (NeMo-RL): b_i the mean of the others, σ_i their std."""
    n = stats.count[index]  # (B,)
    flat = stats.flat[index]
    # r − mean(others) = n/(n−1)·(r − μ); NeMo-RL sets a one-response group's baseline to its
    # own reward, so A = 0 there
    centred = torch.where(n == 1, 0.0, (r - stats.mean[index]) * n / (n - 1).clamp(min=1))
    centred = torch.where(flat, 0.0, centred)  # (B,)
    if not norm_by_std:
        return centred
    if scope == "batch":
        sigma_i = (r.std(correction=int(unbiased)) if r.numel() > 1 else r.new_ones(())).expand_as(r)
    else:
        sigma_i = group_loo_std(r, index, stats.count.numel(), unbiased=unbiased)
    # NeMo-RL: divide only where the std is positive; elsewhere keep r − b
    out = torch.where(sigma_i > 0, centred / (sigma_i + eps), centred)
    return torch.where(flat, 0.0, out)


# --------------------------------------------------------------------------------------------
# grpo (catalog B1; NeMo-RL leave-one-out)
# --------------------------------------------------------------------------------------------


class GrpoParams(StageParams):
    norm_by_std: bool = Field(
        True, description="Divide by the std (GRPO); false gives r − b (Dr.GRPO; verl norm_adv_by_std_in_grpo)."
    )
    eps: float = Field(
        1e-6, ge=0, le=1, description="Added to the std before dividing: 1e-6 verl and NeMo-RL, 1e-4 TRL, "
        "1e-9 OpenRLHF, 1e-8 oat."
    )
    std: Literal["sample", "population"] = Field("sample", description=_STD_DOC)
    scope: Literal["group", "batch"] = Field(
        "group", description="Where the std comes from: each group's own (verl, TRL 'group'; with the "
        "leave-one-out baseline, the std of the other responses, as NeMo-RL) or the whole batch's (TRL "
        "scale_rewards='batch', LitePPO). The baseline is always the group's."
    )
    baseline: Literal["mean", "leave_one_out"] = Field(
        "mean", description="mean: the group mean (verl, TRL); leave_one_out: the mean of the group's other "
        "responses, with the std of the others (NeMo-RL use_leave_one_out_baseline, its default)."
    )


@stage(
    "grpo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=GrpoParams,
    paper="Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300; conventions of verl "
    "compute_grpo_outcome_advantage, TRL GRPOTrainer and NeMo-RL (catalog B1)",
)
def grpo(rewards, groups, *, norm_by_std, eps, std, scope, baseline):
    """Group-relative advantage: each reward against its group's baseline, scaled by a std.

        A_i = (r_i − b_i) / (σ_i + eps)    norm_by_std = true
        A_i =  r_i − b_i                   norm_by_std = false

    baseline = "mean" (verl, TRL): b_i = μ_g, the mean of the rewards of response i's group g;
    σ_i is the group's std (scope = "group") or the std of all B rewards of the batch (scope =
    "batch", exactly TRL scale_rewards="batch": group mean, batch-wide std, sample or
    population). A group of one response uses μ = 0 and σ = 1, as verl does (in both scopes).

    baseline = "leave_one_out" (NeMo-RL use_leave_one_out_baseline = true):
    b_i = (Σ_{j∈g} r_j − r_i)/(n − 1), the mean of the n − 1 other responses, and with scope =
    "group" σ_i is the std of those others (std = "sample": divisor n − 2, NeMo-RL's
    Bessel-corrected leave-one-out std). As in NeMo-RL the division happens only where σ_i > 0:
    where the others are all equal (always so in a group of two) A_i = r_i − b_i, undivided. A
    group of one gets A = 0 (NeMo-RL sets its baseline to its own reward).

    Shapes: rewards (B,), groups.group_index (B,) → (B,). A group of two or more responses
    whose rewards are all equal gets exactly A = 0 for every response (both baselines). The
    advantage is per sequence; a loss broadcasts it to every token of the response.

    Example (verl defaults): rewards [1, 0, 0, 1] in one group → [0.866, −0.866, −0.866, 0.866];
    [0.2, 0.9, 0, 0.5] → [−0.511, 1.277, −1.022, 0.255]. Leave-one-out: [1, 0, 0, 1] →
    [1.155, −1.155, −1.155, 1.155] (response 1: b = 1/3, σ of [0, 0, 1] = 0.577);
    [1, 0, 0, 0] → [1, −0.577, −0.577, −0.577] (response 1's others are all 0: σ = 0, A = 1 − 0).
    """
    return _group_relative(rewards, groups, norm_by_std=norm_by_std, eps=eps, std=std, scope=scope, baseline=baseline)


# --------------------------------------------------------------------------------------------
# group_normalize + batch_whiten (GDPO as composition; TRL normalize_then_sum)
# --------------------------------------------------------------------------------------------


class GroupNormalizeParams(StageParams):
    eps: float = Field(
        1e-4, ge=0, le=1, description="Added to the std before dividing: 1e-4 TRL (GDPO), 1e-6 verl and NeMo-RL."
    )
    std: Literal["sample", "population"] = Field("sample", description=_STD_DOC)
    baseline: Literal["mean", "leave_one_out"] = Field(
        "mean", description="mean: the group mean (TRL); leave_one_out: the mean and std of the group's "
        "other responses (NeMo-RL), as grpo's."
    )


@stage(
    "group_normalize",
    kind="signal",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=GroupNormalizeParams,
    paper="Liu et al., GDPO (group reward-decoupled normalization), arXiv:2601.05242; conventions of TRL "
    "GRPOTrainer multi_objective_aggregation='normalize_then_sum' (catalog B1, GDPO note)",
)
def group_normalize(rewards, groups, *, eps, std, baseline):
    """Per-group z-score of one reward: a Signal again, to be combined before an estimator.

        s_i = (r_i − μ_g) / (σ_g + eps)

    μ_g and σ_g are the mean and std of the rewards of response i's group (the same rule as
    grpo with scope = "group"; baseline = "leave_one_out" uses the others' mean and std). This
    is the first step of GDPO: normalise each reward per group, take the weighted sum, then
    z-score the whole batch. A spec writes TRL's normalize_then_sum as

        advantage adv = batch_whiten(0.7 * group_normalize(r1, groups)
                                     + 0.3 * group_normalize(r2, groups), groups)

    (defaults: eps 1e-4 and sample std in both stages, as TRL).

    Shapes: rewards (B,) → (B,). A group of two or more equal rewards gives exactly 0 (TRL
    divides a rounding residue by 1e-4 there); a group of one gives r/(1 + eps) (verl's μ = 0,
    σ = 1; TRL never has one in training).

    Example: rewards [1, 1, 0, 1] in one group: μ = 0.75, σ = 0.5 → [0.4999, 0.4999, −1.4997,
    0.4999] (each 0.25/0.5001 or −0.75/0.5001).
    """
    return _group_relative(rewards, groups, norm_by_std=True, eps=eps, std=std, scope="group", baseline=baseline)


class BatchWhitenParams(StageParams):
    eps: float = Field(
        1e-4, ge=0, le=1, description="The epsilon: added to the std (eps_at 'std', TRL GDPO 1e-4) or to the "
        "variance (eps_at 'var', verl masked_whiten 1e-8)."
    )
    std: Literal["sample", "population"] = Field("sample", description=_STD_DOC)
    eps_at: Literal["std", "var"] = Field(
        "std", description="std: (x − μ)/(σ + eps) (TRL); var: (x − μ)/sqrt(σ² + eps) (verl masked_whiten)."
    )


@stage(
    "batch_whiten",
    kind="advantage",
    inputs={"values": "Signal[*]", "groups": "Rollouts"},
    output="Advantage[*]",
    params=BatchWhitenParams,
    paper="Liu et al., GDPO, arXiv:2601.05242 (the final batch z-score); conventions of TRL "
    "normalize_then_sum and verl masked_whiten (catalog B1, GDPO note; shared helpers)",
)
def batch_whiten(values, groups, *, eps, std, eps_at):
    """Batch-wide z-score of a signal: the advantage (x − μ)/(σ + eps).

        A = (x − μ) / (σ + eps)         eps_at = "std"  (TRL)
        A = (x − μ) / sqrt(σ² + eps)    eps_at = "var"  (verl masked_whiten)

    μ and σ are over the whole batch, not a group: over the B responses for a sequence signal
    (B,), over all valid tokens (groups.mask > 0) for a token signal (B, T), so a longer
    response weighs more there. Output: the input's shape, 0 on padding.

    All-equal inputs (every valid value the same, compared exactly; or a single valid value)
    give exactly 0. Groups play no part, so an all-equal group is not 0 in general: it gets
    (x_g − μ)/σ.

    Example: GDPO on rewards r1 = [1, 0, 0, 1 | 1, 1, 1, 1 | 0.2, 0.9, 0, 0.5] and
    r2 = [1, 1, 0, 1 | 0, 1, 1, 1 | 1, 1, 1, 1] (three groups of four), with 0.7·group_normalize(r1)
    + 0.3·group_normalize(r2) → [1.2226, −0.7376, −1.7076, 1.2226, −0.7275, 0.2425, 0.2425,
    0.2425, −0.5780, 1.4449, −1.1559, 0.2890].
    """
    x = values.to(torch.float32)
    mask = groups.mask if x.dim() == 2 else None  # a sequence signal: every response counts
    return masked_whiten(x, mask, eps=eps, unbiased=std == "sample", eps_at=eps_at)


# --------------------------------------------------------------------------------------------
# rloo (catalog B4)
# --------------------------------------------------------------------------------------------


class RlooParams(StageParams):
    singleton: Literal["keep", "zero"] = Field(
        "keep", description="A group of one response: keep its reward as the advantage (verl, baseline 0) "
        "or give it 0 (NeMo-RL's leave-one-out baseline is the reward itself)."
    )


@stage(
    "rloo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=RlooParams,
    paper="Ahmadian et al., Back to Basics: REINFORCE-style optimization (RLOO), arXiv:2402.14740; "
    "conventions of verl compute_rloo_outcome_advantage (catalog B4)",
)
def rloo(rewards, groups, *, singleton):
    """REINFORCE leave-one-out: each reward against the mean of the other responses of its group.

        A_i = r_i − (1/(n − 1)) Σ_{j∈g, j≠i} r_j  =  n/(n − 1) · (r_i − μ_g)

    No std. n is the size of response i's group g. Shapes: rewards (B,) → (B,).

    A group of one response keeps A = r_i (verl; singleton = "zero" gives 0, as NeMo-RL). A
    group of two or more equal rewards gets exactly 0.

    Example: group [0.2, 0.9, 0, 0.5] (μ = 0.4, n/(n−1) = 4/3) → [−0.267, 0.667, −0.533, 0.133].
    """
    index = groups.group_index
    r = rewards.to(torch.float32)
    stats = group_stats(r, index, groups.num_groups)
    # r − centre is r − μ_g (a singleton: r; a flat group: exactly 0), scaled by n/(n − 1)
    factor = torch.where(stats.one, 1.0 if singleton == "keep" else 0.0, stats.count / (stats.count - 1))
    out = (r - stats.centre()[index]) * factor[index]
    if singleton == "zero":  # 0 whatever the reward holds
        out = torch.where(stats.one[index], 0.0, out)
    return out


# --------------------------------------------------------------------------------------------
# opo (catalog B7)
# --------------------------------------------------------------------------------------------


@stage(
    "opo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    paper="Hao et al., On-Policy RL with Optimal Reward Baseline (OPO), arXiv:2505.23585; conventions of "
    "verl compute_opo_outcome_advantage (catalog B7)",
)
def opo(rewards, groups):
    """Length-weighted group baseline: the optimal baseline when the gradient norm grows with length.

        b_g = Σ_{j∈g} |y_j| r_j / Σ_{j∈g} |y_j|,     A_i = r_i − b_g

    |y_j| is the number of response tokens of response j (groups.mask summed over T). No std.
    Shapes: rewards (B,), groups.mask (B, T) → (B,).

    A group of one response has b = 0 (verl), so A = r_i. A group of two or more equal rewards
    gets exactly 0. A group whose responses are all empty has b = 0 (verl divides 0 by 0).

    Example: group [1, 0, 0, 1] with lengths [6, 5, 4, 6]: b = 12/21 → [0.429, −0.571, −0.571,
    0.429].
    """
    index, num_groups = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)
    lengths = groups.mask.sum(-1).to(torch.float32)  # (B,)
    den = group_sum(lengths, index, num_groups)
    base = group_sum(lengths * r, index, num_groups) / den.clamp(min=1)  # (G,); lengths are whole numbers
    return r - group_stats(r, index, num_groups).centre(base)[index]  # singleton: b = 0; flat group: 0


# --------------------------------------------------------------------------------------------
# gpg (catalog B8)
# --------------------------------------------------------------------------------------------


class GpgParams(StageParams):
    f_norm: float = Field(1.0, gt=0, description="The divisor F_norm of the centred reward (verl f_norm = 1.0).")
    alpha: Literal["nonzero_reward", "nonzero_advantage", "none"] = Field(
        "nonzero_reward", description="The batch factor α = B / max(1, M): M counts responses with a "
        "non-zero reward (verl), or with a non-zero advantage (the paper's 'valid samples', reconstructed "
        "from its description); none: α = 1."
    )


@stage(
    "gpg",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=GpgParams,
    paper="Chu et al., GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning, "
    "arXiv:2504.02546; conventions of verl compute_gpg_outcome_advantage (catalog B8)",
)
def gpg(rewards, groups, *, f_norm, alpha):
    """Group Policy Gradient advantage: the group-centred reward scaled by a batch factor α.

        A_i = α · (r_i − μ_g) / F_norm,     α = B / max(1, M)

    B is the number of responses in the batch. verl (alpha = "nonzero_reward") counts
    M = #{i : r_i ≠ 0}, the non-zero **rewards** of the whole batch, and overwrites any α passed
    in. The paper motivates α by the number of valid samples (those whose advantage is not
    zero, i.e. outside all-correct / all-wrong groups); alpha = "nonzero_advantage" counts
    M = #{i : A_i ≠ 0} — reconstructed from the paper's description, not verified against its
    code. The matching loss is −A·log π (no ratio, no clip).

    Shapes: rewards (B,) → (B,). A group of one response has μ = 0 (verl), so A = α·r_i/F_norm.
    A group of two or more equal rewards gets exactly 0 (and still counts in verl's M when
    its rewards are non-zero).

    Example (verl): rewards [1, 0, 0, 1 | 1, 1, 1, 1 | 0.2, 0.9, 0, 0.5] in three groups: nine
    non-zero rewards, α = 12/9 = 4/3 → [0.667, −0.667, −0.667, 0.667, 0, 0, 0, 0, −0.267, 0.667,
    −0.533, 0.133].
    """
    r = rewards.to(torch.float32)
    centred = r - group_stats(r, groups.group_index, groups.num_groups).centre()[groups.group_index]
    if alpha == "none":
        return centred / f_norm
    m = torch.count_nonzero(r if alpha == "nonzero_reward" else centred)
    return (r.numel() / f_norm) / m.clamp(min=1).to(r.dtype) * centred  # α / F_norm, then one product


# --------------------------------------------------------------------------------------------
# grpo_passk (catalog B9)
# --------------------------------------------------------------------------------------------


class PasskParams(StageParams):
    norm_by_std: bool = Field(
        True, description="Divide the gap by the group's std + eps (verl norm_adv_by_std_in_grpo)."
    )
    eps: float = Field(1e-6, ge=0, le=1, description="Added to the std before dividing (verl 1e-6).")
    std: Literal["sample", "population"] = Field("sample", description=_STD_DOC)


@stage(
    "grpo_passk",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=PasskParams,
    paper="Tang et al., Optimizing Language Models for Inference Time Objectives using Reinforcement "
    "Learning, arXiv:2503.19595 (as verl cites it); conventions of verl compute_grpo_passk_outcome_advantage "
    "(catalog B9)",
)
def grpo_passk(rewards, groups, *, norm_by_std, eps, std):
    """Pass@k advantage: only the best response of each group is credited, by its lead.

        i* = argmax_{i∈g} r_i,    A_{i*} = (r_max − r_(2)) / (σ_g + eps),    A_i = 0 for i ≠ i*

    r_(2) is the second-largest reward of the group (a tie for first gives 0, so which of the
    tied responses is i* does not matter; the first in batch order is taken). σ_g is the
    group's std; norm_by_std = false leaves the gap undivided.

    Shapes: rewards (B,) → (B,). A group of two or more equal rewards gets exactly 0. A group of
    one response is an error (verl raises "Pass@k requires at least 2 samples per group"): this
    stage raises ValueError naming the group.

    Example: group [0.2, 0.9, 0, 0.5]: i* = 2nd, gap 0.9 − 0.5 = 0.4, σ = 0.3916 →
    [0, 1.0215, 0, 0]; [1, 0, 0, 1] → all 0 (tie for first).
    """
    index, num_groups = groups.group_index, groups.num_groups
    r = rewards.to(torch.float32)
    stats = group_stats(r, index, num_groups)
    if bool((stats.count < 2).any()):
        g = int((stats.count < 2).nonzero()[0])
        raise ValueError(
            f"pass@k needs at least 2 responses per group; group {g} has {int(stats.count[g])} "
            f"(sample n ≥ 2 responses per prompt)"
        )
    B = r.numel()
    pos = torch.arange(B, device=r.device)
    # i* of each group (G,): the first response, in batch order, with the group's largest reward
    star = torch.full((num_groups,), B, dtype=pos.dtype, device=r.device)
    star = star.scatter_reduce_(0, index, torch.where(r == stats.hi[index], pos, B), "amin")
    second = torch.full((num_groups,), -float("inf"), dtype=r.dtype, device=r.device)
    second = second.scatter_reduce_(0, index, r.index_fill(0, star, -float("inf")), "amax")  # i* left out
    gap = stats.hi - second  # (G,), ≥ 0
    if norm_by_std:
        sigma = group_std(r, index, num_groups, stats.mean, stats.count, unbiased=std == "sample")
        gap = torch.where(gap == 0, 0.0, gap / (sigma + eps))
    return torch.zeros_like(r).index_copy_(0, star, gap)


# --------------------------------------------------------------------------------------------
# maxrl
# --------------------------------------------------------------------------------------------


class MaxrlParams(StageParams):
    eps: float = Field(1e-6, gt=0, le=1, description="Added to the group mean before dividing (official code 1e-6).")
    singleton: Literal["mean_zero", "zero"] = Field(
        "mean_zero", description="A group of one response: the official code's group mean 0, so A = r/eps "
        "(1e6·r at the default eps); zero: A = 0."
    )


@stage(
    "maxrl",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=MaxrlParams,
    paper="Tajwar, Zeng et al., Maximum Likelihood Reinforcement Learning (MaxRL), arXiv:2602.02710; "
    "conventions of the official code (tajwarfahim/maxrl, verl compute_maxrl_outcome_advantage)",
)
def maxrl(rewards, groups, *, eps, singleton):
    """Maximum-likelihood RL advantage: the group-centred reward divided by the group's pass rate.

        A_i = (r_i − μ_g) / (μ_g + eps)

    For binary rewards μ_g is the empirical pass rate p̂ = K/n of the prompt, and the estimator
    is the on-policy gradient of log p (maximum likelihood of success) rather than of p
    (pass@1, what REINFORCE/GRPO follow): a correct response gets (n − K)/K, a wrong one −1, so
    hard prompts (few successes) get large weight. Equivalently (eps = 0),
    Σ_i A_i ∇log π_i = n · (mean of ∇log π over the K successes − mean over all n).
    Checked against the official code (tajwarfahim/maxrl, verl/trainer/ppo/core_algos.py:
    ``compute_maxrl_outcome_advantage``, and the repository's earlier ``p_normalization``
    estimator with the same formula): the group mean, not the std, in the denominator. Rewards
    are meant to be non-negative (pass/fail); with μ_g + eps ≤ 0 the division is undefined.

    Shapes: rewards (B,) → (B,). A group of two or more equal rewards gets exactly 0 (an
    all-wrong group: 0/eps = 0 in the code too). A group of one response: the code uses
    μ = 0, so A = r/eps (singleton = "zero" gives 0 instead).

    Example: group [1, 0, 0, 0] (p̂ = 1/4) → [3.000, −1.000, −1.000, −1.000] (up to eps);
    [1, 0, 0, 1] → [1.000, −1.000, −1.000, 1.000]; [1, 1, 1, 1] and [0, 0, 0, 0] → 0.
    """
    index = groups.group_index
    r = rewards.to(torch.float32)
    stats = group_stats(r, index, groups.num_groups)
    mu = torch.where(stats.one, 0.0, stats.mean)  # (G,), 0 for a singleton (the code's group mean)
    centred = r - stats.centre(mu)[index]  # exactly 0 on a flat group
    out = torch.where(centred == 0, 0.0, centred / (mu + eps)[index])
    if singleton == "zero":
        out = torch.where(stats.one[index], 0.0, out)
    return out


# --------------------------------------------------------------------------------------------
# reinforce_pp, reinforce_pp_baseline (catalog B5)
# --------------------------------------------------------------------------------------------


class ReinforcePPParams(StageParams):
    gamma: float = Field(1.0, ge=0, le=1, description="The discount γ of the reward-to-go (verl algorithm.gamma = 1.0).")
    eps: float = Field(1e-8, ge=0, le=1, description="Added to the variance in the whitening (verl masked_whiten 1e-8).")
    std: Literal["sample", "population"] = Field(
        "sample", description="The whitening variance over all valid tokens: sample (verl masked_var, N−1) or "
        "population (N)."
    )


@stage(
    "reinforce_pp",
    kind="advantage",
    inputs={"rewards": "Signal[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=ReinforcePPParams,
    paper="Hu, REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models, "
    "arXiv:2501.03262; conventions of verl compute_reinforce_plus_plus_outcome_advantage (catalog B5)",
)
def reinforce_pp(rewards, groups, *, gamma, eps, std):
    """REINFORCE++: discounted reward-to-go, whitened over every valid token of the batch.

        G_{i,t} = r_{i,t} + γ · m_{i,t+1} · G_{i,t+1}              (computed backwards)
        A_{i,t} = (G_{i,t} − μ) / sqrt(σ² + eps) · m_{i,t}

    μ and σ² are the mean and variance of G over all valid tokens (m = groups.mask) of the
    whole batch — no groups. The running return resets to 0 at a position outside the mask, so
    nothing flows back across padding (or a masked span).

    rewards: a sequence reward (B,) is placed at each response's last valid token (as verl's
    reward manager does) — with γ = 1 every token of a response then has G = r_i; or a token
    reward (B, T) (for instance an outcome reward at the last token minus a per-token KL
    penalty), used as it is, padding ignored. Output (B, T), 0 on padding.

    Groups play no part: an all-equal group is not 0 (its tokens get (r − μ)/σ), a one-response
    group is like any other. All-equal returns over the whole batch give exactly 0.

    Example: the rewards [1, 0, 0, 1 | 1, 1, 1, 1 | 0.2, 0.9, 0, 0.5], every response 6 tokens,
    γ = 1: μ = 0.6333, σ² = 0.19324 → every token of row 0 gets 0.834, of row 1 −1.441.
    """
    mask = groups.mask
    lengths = mask.sum(-1)  # (B,)
    whiten = dict(eps=eps, unbiased=std == "sample", eps_at="var")
    r = rewards.to(torch.float32)
    prefix = no_holes(mask, lengths)  # no response has a masked span
    if r.dim() == 1 and prefix:  # outcome reward on the last of L_i tokens: G_t = r_i γ^(L_i − 1 − t)
        if gamma == 1.0:  # G = r_i on every token: whiten B numbers, not B × T
            return masked_whiten_rows(r, mask, lengths=lengths, **whiten)
        t = torch.arange(mask.shape[-1], device=mask.device, dtype=lengths.dtype)
        steps_left = (lengths[:, None] - 1 - t).clamp(min=0)  # L_i − 1 − t; 0 on padding, where γ^−k may overflow
        returns = r[:, None] * torch.pow(torch.tensor(gamma, dtype=r.dtype, device=r.device), steps_left)
        return masked_whiten(returns, mask, padding="finite", **whiten)
    tok = place_at_last_token(r, mask)  # (B, T), 0 on padding
    returns = discounted_returns(tok, mask, gamma, prefix=prefix)
    # with prefix masks and γ = 1 the returns are 0 on padding (a reverse sum of zeros)
    return masked_whiten(returns, mask, padding="zero" if prefix and gamma == 1.0 else "finite", **whiten)


class ReinforcePPBaselineParams(StageParams):
    eps: float = Field(1e-8, ge=0, le=1, description="Added to the variance in the whitening (verl masked_whiten 1e-8).")
    std: Literal["sample", "population"] = Field(
        "sample", description="The whitening variance over all valid tokens: sample (verl masked_var, N−1) or "
        "population (N)."
    )


@stage(
    "reinforce_pp_baseline",
    kind="advantage",
    inputs={"rewards": "Signal[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=ReinforcePPBaselineParams,
    paper="Hu, REINFORCE++, arXiv:2501.03262 (the group-baseline variant); conventions of verl "
    "compute_reinforce_plus_plus_baseline_outcome_advantage (catalog B5)",
)
def reinforce_pp_baseline(rewards, groups, *, eps, std):
    """REINFORCE++-baseline: the group-centred reward on every token, whitened over the batch's tokens.

        A_{i,t} = whiten((r_i − μ_g) · m_{i,t})        over all valid tokens of the batch

    whiten(x) = (x − μ)/sqrt(σ² + eps) with μ, σ² of x over every valid token (verl
    masked_whiten), so a longer response weighs more in the statistics. r_i is the sequence
    reward (B,), or the sum over valid tokens of a token reward (B, T) (verl sums the token
    rewards). Output (B, T), 0 on padding.

    A group of one response has μ_g = 0 (verl), so it keeps r_i before whitening. A group of
    two or more equal rewards is exactly 0 before whitening but not after: its tokens get
    −μ/σ. All-equal values over the whole batch give exactly 0.

    Example: groups [1, 0, 0, 1] (lengths 6, 5, 4, 6) and [1, 1] (lengths 3, 3): the centred
    tokens are 0.5 × 12, −0.5 × 9, 0 × 6: μ = 0.05556, σ² = 0.19872 → every token of row 0
    gets 0.9970, of row 1 −1.2463, of the all-equal group −0.1246.
    """
    index = groups.group_index
    mask = groups.mask
    r = rewards.to(torch.float32)
    if r.dim() == 2:
        r = torch.where(mask > 0, r, 0.0).sum(-1)  # padding may hold NaN
    centred = r - group_stats(r, index, groups.num_groups).centre()[index]  # singleton: μ = 0; flat group: 0
    return masked_whiten_rows(centred, mask, eps=eps, unbiased=std == "sample", eps_at="var")


@stage(
    "remax",
    kind="advantage",
    inputs={"rewards": "Signal[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    needs=("greedy_baseline",),
    paper="Li et al., ReMax, arXiv:2310.10505; as verl compute_remax_outcome_advantage (catalog B6)",
)
def remax(rewards, groups):
    """REINFORCE with the greedy response's reward as the baseline.

        G_{i,t} = Σ_{k ≥ t} r_{i,k} m_{i,k}          (reward-to-go; a sequence reward sits on the last token)
        A_{i,t} = G_{i,t} − b_i · m_{i,t}             b_i = reward of the greedy decode of prompt i

    The runtime makes one greedy rollout per prompt and scores it with the same graph that
    computes ``rewards`` (the `greedy_baseline` need); `replay` reads it from
    ``extra.greedy_baseline``. Every response of a prompt shares its baseline, so a group whose
    sampled responses all score like the greedy one gets 0. Example: outcome rewards [1, 0] of
    one prompt whose greedy response scored 1, lengths 2 and 1: A = [[0, 0], [−1, 0]].
    """
    mask = groups.mask  # (B, T)
    baseline = torch.as_tensor(groups.need("greedy_baseline"), dtype=torch.float32, device=mask.device)  # (B,)
    if rewards.dim() == 1:  # an outcome reward sits on the last token: G_t = r_i on every token
        row = rewards.to(torch.float32) - baseline
        row = torch.where(mask.sum(-1) > 0, row, 0.0)  # an empty row stays 0, even if NaN
        return row[:, None] * mask
    token_rewards = torch.where(mask > 0, rewards.to(torch.float32), 0.0)  # (B, T), padding may hold NaN
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1)
    return (returns - baseline[:, None]) * mask
