"""Train/inference mismatch correction: the rollout engine's log-probs against the trainer's.

An inference engine (vLLM) samples with its own kernels and precision, so the probability it
gave a sampled token, π_rollout, differs from the trainer's recomputation π_old of the same
token. The policy gradient is then off-policy by w = π_old / π_rollout. These stages follow
verl's rollout correction (algorithm.rollout_correction): importance weights truncated at an
upper threshold (TIS), or tokens and responses outside a band dropped from the loss
(rejection sampling), at the token or the sequence level.

    w_t   = exp(log π_old(y_t) − log π_rollout(y_t))                    token level
    w_seq = exp(Σ_t log π_old(y_t) − log π_rollout(y_t))                sequence level (all its tokens)

Both need ``rollout_logprobs`` (recorded by the engine while it samples) and ``logprobs`` (the
trainer's behaviour pass). With the ``generate`` engine they differ only by the numerics of
the key/value-cache decode against a full forward, so the weights sit at 1 ± 1e-6.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import to_tokens
from shapeflow.stdlib.registry import StageParams, stage

_PAPER = ("Yao et al., Your Efficient RL Framework Secretly Brings You Off-Policy RL Training (truncated importance "
          "sampling, 2025); as verl algorithm.rollout_correction (rollout_is, rollout_rs)")


def _log_weights(groups, level: str) -> "torch.Tensor":
    """(B, T) log w per token: its own (token level) or its response's sum (sequence level)."""
    mask = groups.mask
    old = torch.where(mask > 0, groups.need("logprobs").to(torch.float32), 0.0)
    rollout = torch.where(mask > 0, groups.need("rollout_logprobs").to(torch.float32), 0.0)
    delta = (old - rollout) * (mask > 0)
    if level == "sequence":
        delta = delta.sum(-1, keepdim=True).expand_as(delta)
    return delta


def _report(ctx, **values) -> None:
    if ctx is not None:
        for key, value in values.items():
            ctx.log(key, float(value))


class TisParams(StageParams):
    level: Literal["token", "sequence"] = Field("token", description="Weight each token by its own ratio (verl "
                                                "rollout_is = 'token') or by its response's product ('sequence').")
    threshold: float = Field(2.0, gt=0, le=1e6, description="C: weights above it are truncated to it (verl "
                             "rollout_is_threshold 2.0).")


@stage(
    "mismatch.tis",
    kind="advantage",
    inputs={"adv": "Advantage[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=TisParams,
    needs=("logprobs", "rollout_logprobs"),
    context=True,
    paper=_PAPER,
)
def tis(adv, groups, *, level, threshold, ctx=None):
    """Truncated importance sampling: A'_t = min(w, C) · A_t, w from the trainer's and the
    engine's log-probs (token or sequence level; detached).

    Scaling the advantage by a positive w equals scaling PPO's per-token loss by w (clip and
    dual clip included), which is where verl multiplies it. Reported per step:
    ``rollout/<binding>/truncated_frac`` (the fraction of valid tokens whose weight hit C) and
    ``weight_mean``. Example (token level, C = 2): log-prob gaps old − rollout [0.1, 1.0, −0.5]
    give w = [1.1052, 2.7183 → 2, 0.6065]; one token of three is truncated.
    """
    mask = groups.mask
    weights = torch.exp(_log_weights(groups, level)).detach()
    clipped = weights.clamp(max=threshold)
    valid = mask > 0
    n = valid.sum().clamp(min=1)
    _report(ctx, truncated_frac=((weights > threshold) & valid).sum() / n,
            weight_mean=(clipped * valid).sum() / n)
    return to_tokens(adv.to(torch.float32), mask) * clipped * valid


class RejectParams(StageParams):
    level: Literal["token", "sequence"] = Field("token", description="Drop single tokens (verl rollout_rs = 'token') "
                                                "or whole responses ('sequence').")
    low: float = Field(0.5, gt=0, le=1, description="Tokens or responses with w below it are dropped.")
    high: float = Field(2.0, ge=1, le=1e6, description="... and those with w above it.")

    @model_validator(mode="after")
    def _band(self):
        if self.low >= self.high:
            raise ValueError("low must be below high")
        return self


@stage(
    "mismatch.reject",
    kind="rollout",
    inputs={"groups": "Rollouts"},
    output="Rollouts",
    params=RejectParams,
    needs=("logprobs", "rollout_logprobs"),
    context=True,
    paper=_PAPER,
)
def reject(groups, *, level, low, high, ctx=None):
    """Rejection by the mismatch ratio: tokens (or whole responses) with w outside [low, high]
    are masked out of the loss, and out of its token counts, as ``rollouts.drop_truncated``.

        m'_t = m_t · 1[low ≤ w ≤ high]

    Pass the result to the loss: ``losses.ppo_clip(adv, mismatch.reject(groups))``; rewards and
    advantages computed from ``groups`` are unchanged. Reported: ``rollout/<binding>/masked_frac``
    (the fraction of valid tokens dropped). Example (token level, band [0.5, 2]): gaps
    [0.1, 1.0, −1.0] give w = [1.105, 2.718, 0.368]; the last two tokens are dropped.
    """
    mask = groups.mask
    weights = torch.exp(_log_weights(groups, level))
    keep = (weights >= low) & (weights <= high)
    valid = mask > 0
    _report(ctx, masked_frac=(valid & ~keep).sum() / valid.sum().clamp(min=1))
    kept = groups.select(torch.arange(groups.size, device=mask.device))
    kept.mask = mask * keep.to(mask.dtype)
    return kept
