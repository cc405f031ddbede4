"""Token-level baselines: a baseline per position rather than one per response.

verl's optimal token baseline (OTB) weights each response's return-to-go by the "realized
energy" of its path so far, estimated from the forward pass alone (Σπ², the logit-gradient
proxy), so that noisy prefixes pull the baseline less than confident ones.
"""

from __future__ import annotations

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import group_count, place_at_last_token
from shapeflow.stdlib.registry import StageParams, stage


class OtbParams(StageParams):
    eps: float = Field(1e-8, ge=0, le=1, description="Added to the denominator Σ_i W_t (verl epsilon 1e-8).")
    zero_tail: bool = Field(True, description="verl handle_zero_tail (default true): where one response of a "
                            "group is longer than all the others, its baseline past the second-longest length is "
                            "0 (no other response informs it), so the return itself is its advantage there.")


@stage(
    "optimal_token_baseline",
    kind="advantage",
    inputs={"rewards": "Signal[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=OtbParams,
    needs=("logprobs", "sum_pi_squared"),
    paper="Optimal Token Baseline (OTB), arXiv:2602.07078; as verl compute_optimal_token_baseline_advantage "
    "(adv_estimator = optimal_token_baseline, actor.calculate_sum_pi_squared = true)",
)
def optimal_token_baseline(rewards, groups, *, eps, zero_tail):
    """Per-token baseline B_t = Σ_i G_{i,t}·W_{i,t} / Σ_i W_{i,t} over the prompt's group.

        G_{i,t} = Σ_{s ≥ t} r_{i,s} m_{i,s}                 return-to-go (γ = 1)
        w_{i,t} = 1 − 2π_{i,t} + Σ_v π_{i,t}(v)²            ‖∇_z log π(y_t)‖², the logit-gradient proxy
        W_{i,t} = Σ_{j ≤ t} w_{i,j} m_{i,j}                 realised energy of the path so far
        B_t     = Σ_i G_{i,t} W_{i,t} m_{i,t} / (Σ_i W_{i,t} m_{i,t} + eps)
        A_{i,t} = (G_{i,t} − B_t) · m_{i,t}

    π_{i,t} = exp(behaviour log-prob) and Σπ² come from the behaviour pass at the rollout
    temperature (need ``sum_pi_squared``). A sequence reward lands on the last token. A group of
    one response has baseline 0. ``zero_tail`` is verl's handle_zero_tail. Positions are aligned
    across a group (response token t of each member).

    Example (one group: a 2-token response with π = [0.9, 0.2], Σπ² = [0.82, 0.5], a 3-token one
    with π = Σπ² = 0.5 everywhere): W = [0.02, 1.12] and [0.5, 1.0, 1.5]. Rewards 1 and 0: B =
    [0.02/0.52, 1.12/2.12, 0] and A = [0.9615, 0.4717 | −0.0385, −0.5283, 0]. Rewards 0 and 1:
    A = [−0.9615, −0.4717 | 0.0385, 0.5283, 1] (zero_tail: the longer response alone reaches its
    last token, its baseline there is 0), or [.., 0] without zero_tail (B = 1.5/1.5 there).
    """
    mask = groups.mask
    m = mask.to(torch.float32)
    r = place_at_last_token(rewards.to(torch.float32), mask) * m  # (B, T)
    returns = r.flip(-1).cumsum(-1).flip(-1)
    pi = torch.exp(torch.where(mask > 0, groups.need("logprobs").to(torch.float32), 0.0))
    sum_sq = torch.where(mask > 0, groups.need("sum_pi_squared").to(torch.float32), 0.0)
    energy = ((1 - 2 * pi + sum_sq) * m).cumsum(-1)  # W (B, T)
    index, num = groups.group_index, groups.num_groups
    T = mask.shape[1]
    weighted = torch.zeros(num, T, dtype=r.dtype, device=r.device).index_add_(0, index, returns * energy * m)
    total = torch.zeros(num, T, dtype=r.dtype, device=r.device).index_add_(0, index, energy * m)
    baseline = (weighted / (total + eps))[index]  # (B, T)
    singleton = (group_count(index, num, r.dtype) == 1)[index]
    baseline = torch.where(singleton[:, None], torch.zeros_like(baseline), baseline)
    if zero_tail:
        baseline = torch.where(_lone_tail(m.sum(-1), index, num, T), torch.zeros_like(baseline), baseline)
    return (returns - baseline) * m


def _lone_tail(lengths, index, num, T):
    """(B, T) true past the second-longest length of the group, in the group's one longest row."""
    neg = torch.full((num,), -1.0, dtype=lengths.dtype, device=lengths.device)
    longest = neg.scatter_reduce(0, index, lengths, "amax", include_self=True)
    at_max = lengths == longest[index]
    count_max = torch.zeros(num, dtype=lengths.dtype, device=lengths.device).index_add_(0, index, at_max.to(lengths.dtype))
    second = neg.scatter_reduce(0, index, torch.where(at_max, torch.full_like(lengths, -1.0), lengths), "amax",
                                include_self=True)
    lone = at_max & (count_max[index] == 1) & (second[index] >= 0)  # a unique longest row with company
    positions = torch.arange(T, device=lengths.device, dtype=lengths.dtype)
    return lone[:, None] & (positions[None, :] >= second[index][:, None])
