"""Policy losses: update-phase stages over the current policy's log-probs, giving a Loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import aggregate, to_tokens
from shapeflow.stdlib.params import Aggregation
from shapeflow.stdlib.registry import StageParams, stage

_AGG = (
    "How per-token terms become one number (verl loss_agg_mode): token-mean, seq-mean-token-sum, "
    "seq-mean-token-mean (original GRPO; TRL 'grpo'), seq-mean-token-sum-norm (Dr.GRPO)."
)
_SCALE = (
    "Normaliser of seq-mean-token-sum-norm; none uses the padded length of the batch as verl does. "
    "Set it to the maximum response length to reproduce the Dr.GRPO paper; TRL's dr_grpo divides by "
    "B × max_completion_length."
)


class AggregationParams(StageParams):
    agg: Aggregation = Field("token-mean", description=_AGG)
    loss_scale_factor: float | None = Field(None, gt=0, description=_SCALE)

    @model_validator(mode="after")
    def _scale_only_with_norm(self):
        if self.loss_scale_factor is not None and self.agg != "seq-mean-token-sum-norm":
            raise ValueError("loss_scale_factor applies only to agg = \"seq-mean-token-sum-norm\"")
        return self


class PpoClipParams(AggregationParams):
    eps_low: float = Field(0.2, ge=0, lt=1, description="Lower clip: the ratio is kept above 1 − eps_low.")
    eps_high: float = Field(0.2, ge=0, le=10, description="Upper clip: the ratio is kept below 1 + eps_high "
                            "(DAPO's clip-higher uses 0.28).")
    clip_c: float | None = Field(3.0, gt=1, description="Dual-clip bound for negative advantages "
                                 "(verl clip_ratio_c); none disables the dual clip (TRL).")


@stage(
    "losses.ppo_clip",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=PpoClipParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Schulman et al., PPO, arXiv:1707.06347; dual clip: Ye et al., arXiv:1912.09729; "
    "as verl compute_policy_loss_vanilla (catalog B12)",
)
def ppo_clip(advantages, groups, *, eps_low, eps_high, clip_c, agg, loss_scale_factor):
    """Clipped surrogate with optional dual clip.

        ρ = exp(clamp(log π_θ − log π_old, −20, 20))
        ℓ = max(−A ρ, −A clip(ρ, 1 − eps_low, 1 + eps_high))
        ℓ = min(ℓ, −A c)   where A < 0 (dual clip, c = clip_c)
        L = agg(ℓ)

    Example: A = 1, log-ratio log 1.5 with eps 0.2 gives ℓ = −1.2 (clipped above);
    A = −1, ratio 5 gives min(5, 3) = 3 (dual clip).
    """
    mask = groups.mask  # (B, T)
    adv = to_tokens(advantages, mask)  # (B, T)
    # zero the log-ratio on padding first: a NaN/inf log-prob there then gives neither a NaN loss
    # nor a NaN gradient, without relying on clamp's backward dropping NaN inputs
    log_ratio = to_tokens(groups.need("policy_logprobs") - groups.need("logprobs"), mask).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return aggregate(loss, mask, agg, loss_scale_factor)


class KlParams(AggregationParams):
    estimator: Literal["k1", "k2", "k3", "abs"] = Field(
        "k3", description="k1 = Δ; k2 = Δ²/2; k3 = exp(−Δ) + Δ − 1 (verl low_var_kl, clamped); abs = |Δ|."
    )


def kl_estimate(logp: "torch.Tensor", ref_logp: "torch.Tensor", estimator: str) -> "torch.Tensor":
    """Per-token KL(π_θ ‖ π_ref) estimate from sampled-token log-probs (catalog B16)."""
    delta = logp - ref_logp
    if estimator == "k1":
        return delta
    if estimator == "abs":
        return delta.abs()
    if estimator == "k2":
        return 0.5 * delta.square()
    d = delta.clamp(-20.0, 20.0)
    return (torch.exp(-d) + d - 1.0).clamp(-10.0, 10.0)


@stage(
    "losses.kl",
    kind="loss",
    inputs={"groups": "Rollouts"},
    output="Loss",
    params=KlParams,
    needs=("policy_logprobs", "ref_logprobs"),
    phase="update",
    paper="Schulman, 'Approximating KL divergence' (k1, k2, k3), 2020; as verl kl_penalty (catalog B16)",
)
def kl(groups, *, estimator, agg, loss_scale_factor):
    """KL penalty to the frozen reference model, as a loss term.

        Δ = log π_θ − log π_ref
        k1 = Δ     k2 = Δ²/2     abs = |Δ|
        k3 = exp(−Δ') + Δ' − 1, Δ' = clamp(Δ, −20, 20), result clamped to [−10, 10]
        L = agg(k)

    Add it to the objective with a coefficient: ``+ 0.001 * losses.kl(groups)``.
    Example: Δ = 0.5 gives k1 0.5, k2 0.125, abs 0.5, k3 exp(−0.5) − 0.5 = 0.10653.
    """
    mask = groups.mask
    logp = to_tokens(groups.need("policy_logprobs"), mask)  # padding zeroed: no NaN value or gradient
    k = kl_estimate(logp, to_tokens(groups.need("ref_logprobs"), mask), estimator)
    return aggregate(k, mask, agg, loss_scale_factor)
