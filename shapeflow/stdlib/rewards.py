"""Reward stages that read rewards computed elsewhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class OverlongParams(StageParams):
    max_len: int = Field(description="L_max: the response length limit (verl max_response_length).", ge=1)
    cache_len: int = Field(description="L_cache: the soft-penalty zone before L_max (verl overlong_buffer.len).",
                           ge=1)
    penalty_factor: float = Field(1.0, ge=0, description="Scale of the penalty (verl overlong_buffer.penalty_factor).")
    floor: bool = Field(False, description="The paper's reading: −1 for responses longer than L_max. The code "
                        "(default) has no floor; generation truncates at L_max, so it rarely matters.")

    @model_validator(mode="after")
    def _cache_within_limit(self):
        if self.cache_len > self.max_len:
            raise ValueError("cache_len must be at most max_len")
        return self


@stage(
    "rewards.overlong_penalty",
    kind="reward",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=OverlongParams,
    paper="Yu et al., DAPO, arXiv:2503.14476 (overlong reward shaping); as verl reward_manager/dapo.py (catalog B3)",
)
def overlong_penalty(groups, *, max_len, cache_len, penalty_factor, floor):
    """DAPO's soft overlong punishment, added to the task reward.

        exceed_i = |y_i| − (L_max − L_cache)
        R_len,i  = min(−exceed_i / L_cache · penalty_factor, 0)      (verl's code)
        R_len,i  = −1  where |y_i| > L_max                            (floor = true: the paper)

    Use it as ``reward r = correct + rewards.overlong_penalty(groups, max_len = 20, cache_len = 8)``.
    Example (L_max 20, L_cache 8): lengths 12, 13, 16, 20 give 0, −0.125, −0.5, −1.0.
    """
    lengths = groups.mask.sum(-1)  # (B,)
    exceed = lengths - (max_len - cache_len)
    penalty = torch.clamp(-exceed / cache_len * penalty_factor, max=0.0)
    if floor:
        penalty = torch.where(lengths > max_len, torch.full_like(penalty, -1.0), penalty)
    return penalty.to(torch.float32)


class KlPenaltyParams(StageParams):
    estimator: Literal["k1", "k2", "k3", "abs"] = Field(
        "k1", description="k1 = Δ (verl's algorithm.kl_penalty default 'kl'); k2 = Δ²/2; k3 = exp(−Δ) + Δ − 1; abs = |Δ|."
    )


@stage(
    "rewards.kl_penalty",
    kind="reward",
    inputs={"groups": "Rollouts"},
    output="Signal[tok]",
    params=KlPenaltyParams,
    needs=("logprobs", "ref_logprobs"),
    paper="Ouyang et al., InstructGPT (KL in the reward), arXiv:2203.02155; as verl use_kl_in_reward (catalog B16)",
)
def kl_penalty(groups, *, estimator):
    """Per-token KL between the behaviour policy and the reference, to subtract from a reward.

        kl_{i,t} = k(log π_old(y_t) − log π_ref(y_t))       (zero on padding)

    verl's ``use_kl_in_reward`` with a fixed coefficient β:
    ``reward r = signals.at_last_token(correct, groups) - 0.001 * rewards.kl_penalty(groups)``
    (an adaptive β needs state across steps and arrives with stateful stages). Computed in
    the rollout phase from the behaviour log-probs, so it carries no gradient. Example:
    log-probs [−1.0, −2.0] against a reference [−1.5, −1.0] give k1 [0.5, −1.0].
    """
    from shapeflow.stdlib.losses import kl_estimate

    mask = groups.mask
    logp = torch.where(mask > 0, groups.need("logprobs"), torch.zeros_like(mask))
    ref = torch.where(mask > 0, groups.need("ref_logprobs"), torch.zeros_like(mask))
    return kl_estimate(logp, ref, estimator) * mask
