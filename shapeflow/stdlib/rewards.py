"""Reward stages that read rewards computed elsewhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.needs import MissingNeed
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
    (``rewards.adaptive_kl_penalty`` for verl's adaptive controller). Computed in
    the rollout phase from the behaviour log-probs, so it carries no gradient. Example:
    log-probs [−1.0, −2.0] against a reference [−1.5, −1.0] give k1 [0.5, −1.0].
    """
    from shapeflow.stdlib.losses import kl_estimate

    mask = groups.mask
    logp = torch.where(mask > 0, groups.need("logprobs"), torch.zeros_like(mask))
    ref = torch.where(mask > 0, groups.need("ref_logprobs"), torch.zeros_like(mask))
    return kl_estimate(logp, ref, estimator) * mask


class AdaptiveKlParams(KlPenaltyParams):
    init_coef: float = Field(0.001, ge=0, le=100, description="β at the first step (verl algorithm.kl_ctrl.kl_coef "
                             "0.001).")
    target: float = Field(0.1, gt=0, le=1e6, description="The KL the controller steers to (verl kl_ctrl.target_kl "
                          "0.1).")
    horizon: float = Field(10000, gt=0, le=1e12, description="How slowly β moves: each step multiplies it by "
                           "1 + e·B/horizon (verl kl_ctrl.horizon 10000).")


@stage(
    "rewards.adaptive_kl_penalty",
    kind="reward",
    inputs={"groups": "Rollouts"},
    output="Signal[tok]",
    params=AdaptiveKlParams,
    needs=("logprobs", "ref_logprobs"),
    state={"coef": "β for the next step (starts at init_coef)",
           "kl": "the last batch's KL, mean over responses of each response's token mean"},
    paper="Ziegler et al., Fine-Tuning LMs from Human Preferences (adaptive KL controller), arXiv:1909.08593; "
    "as verl AdaptiveKLController with use_kl_in_reward (catalog B16)",
)
def adaptive_kl_penalty(groups, *, estimator, init_coef, target, horizon, state):
    """β_t · kl_{i,t}, with β adapted each step towards a target KL (to subtract from a reward).

        kl_{i,t} = k(log π_old(y_t) − log π_ref(y_t))          (as rewards.kl_penalty)
        out_{i,t} = β_t · kl_{i,t}                              (this step's β)
        KL_t  = mean_i [ Σ_t kl_{i,t} m_{i,t} / (Σ_t m_{i,t} + 1e-8) ]   (verl masked_mean per row, then the mean)
        e_t   = clip(KL_t / target − 1, −0.2, 0.2)
        β_t+1 = β_t · (1 + e_t · B / horizon)                   (B responses in the batch)

    As verl's ``apply_kl_penalty``: the batch is penalised with the current β, then the
    controller is updated with that batch's KL. Use
    ``reward r = signals.at_last_token(correct, groups) - rewards.adaptive_kl_penalty(groups)``.
    β and the last KL are the stage's state: saved in checkpoints and logged as
    ``state/<binding>/coef`` and ``state/<binding>/kl``. Example (init_coef 0.2, target 1,
    horizon 100, B = 2): a first batch with KL 1.5 is penalised with β = 0.2 and moves β to
    0.2 · (1 + 0.2 · 2/100) = 0.2008; a second batch with KL 0.5 uses 0.2008 and moves β to
    0.2008 · (1 − 0.2 · 2/100) = 0.1999968.
    """
    kl = kl_penalty(groups, estimator=estimator)  # (B, T), zero on padding
    beta = float(state.setdefault("coef", float(init_coef)))
    mask = groups.mask
    if mask.shape[0] > 0:
        per_row = kl.sum(-1) / (mask.sum(-1) + 1e-8)  # verl masked_mean(axis=-1): an empty row counts as 0
        current = float(per_row.mean())
        error = min(max(current / target - 1.0, -0.2), 0.2)
        state["coef"] = beta * (1.0 + error * int(mask.shape[0]) / horizon)
        state["kl"] = current
    return beta * kl

