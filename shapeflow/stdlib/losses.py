"""Policy losses: update-phase stages over the current policy's log-probs, giving a Loss.

Every loss reads the current policy's log-probs (with gradient) from ``policy_logprobs`` and,
where it has a ratio, the behaviour log-probs from ``logprobs``; padding is zeroed with
``where`` before any arithmetic, so NaN or inf there reaches neither the value nor the gradient.
Formulas and defaults follow the method catalog (B8, B11–B17) and, where the trainers differ,
name the trainer whose convention a parameter picks.
"""

from __future__ import annotations

import math

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import (
    LazyTerms,
    advantage_weight,
    aggregate,
    clamp_by_sign,
    masked,
    reduce_rows,
    row_mean,
    topk_indices,
)
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
    mask, valid, lengths = _mask_parts(groups)
    # zero the log-ratio on padding first: a NaN/inf log-prob there then gives neither a NaN loss
    # nor a NaN gradient, without relying on clamp's backward dropping NaN inputs
    log_ratio = _log_ratio(groups, valid)  # (B, T)
    adv = advantage_weight(advantages, valid, lengths, log_ratio.dtype)  # (B, 1) or (B, T)
    # The max/min form above is one clamp of the log-ratio with bounds set by the sign of A
    # (same value, same gradient):
    #   A > 0: ρ ≤ 1 + eps_high      A < 0: 1 − eps_low ≤ ρ (≤ c with the dual clip)
    log_ratio = clamp_by_sign(
        log_ratio, adv,
        negative=(math.log(1.0 - eps_low), math.log(clip_c) if clip_c is not None else 20.0),
        positive=(-20.0, min(math.log1p(eps_high), 20.0)),
    )
    # exp(0) = 1 on padding: finite, so the mask's product excludes it
    return aggregate(torch.exp(log_ratio), mask, agg, loss_scale_factor, weight=-adv, padding="finite",
                     lengths=lengths)


class KlParams(AggregationParams):
    estimator: Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"] = Field(
        "k3", description="k1 = Δ; k2 = Δ²/2; k3 = exp(−Δ) + Δ − 1 (verl low_var_kl, clamped); abs = |Δ|. "
        "A trailing '+' is verl's straight-through form: the value of the named estimator with the "
        "gradient of k2 (verl documents k3+/low_var_kl+ but raises NotImplementedError for them at "
        "b178a3cd; this is the documented behaviour)."
    )


def kl_estimate(logp: "torch.Tensor", ref_logp: "torch.Tensor", estimator: str) -> "torch.Tensor":
    """Per-token KL(π_θ ‖ π_ref) estimate from sampled-token log-probs (catalog B16).

    ``estimator`` ending in "+" (k1+, k3+, abs+) is straight-through: the forward value of the
    named estimator, the backward of k2 (k2 − sg(k2) + sg(k)), as verl's ``kl_penalty`` documents.
    """
    return kl_of_delta(logp - ref_logp, estimator)


def kl_of_delta(delta: "torch.Tensor", estimator: str) -> "torch.Tensor":
    """``kl_estimate`` from Δ = log π_θ − log π_ref. Every estimator is exactly 0 where Δ = 0."""
    if estimator.endswith("+"):
        value = kl_of_delta(delta, estimator[:-1]).detach()
        k2 = 0.5 * delta.square()
        return k2 - k2.detach() + value
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

    Straight-through variants (verl's documented "+" names; value of the estimator, gradient of k2):
        k1+ = sg(k1) + k2 − sg(k2)   (same for k3+, abs+):  value k, ∂/∂log π_θ = Δ

    Shapes: log-probs (B, T), mask (B, T); returns a scalar. verl puts it in the loss with
    use_kl_loss (kl_loss_type "low_var_kl" = k3, coefficient 0.001); TRL adds an unclamped k3
    with coefficient beta (default 0).

    Add it to the objective with a coefficient: ``+ 0.001 * losses.kl(groups)``.
    Example: Δ = 0.5 gives k1 0.5, k2 0.125, abs 0.5, k3 exp(−0.5) − 0.5 = 0.10653;
    its gradient ∂k/∂log π_θ is 1 (k1), 0.5 (k2), 1 (abs), 1 − exp(−0.5) = 0.39347 (k3), and 0.5
    (k2's) for each of k1+, k3+, abs+, whose values stay 0.5, 0.10653, 0.5.
    """
    mask, valid, lengths = _mask_parts(groups)
    # padding zeroed first (no NaN value or gradient); every estimator is then 0 there
    delta = masked(groups.need("policy_logprobs") - groups.need("ref_logprobs"), valid)
    return aggregate(kl_of_delta(delta, estimator), mask, agg, loss_scale_factor, padding="zero", lengths=lengths)


# --- shared pieces ----------------------------------------------------------------------------


def _mask_parts(groups):
    """(mask, valid, lengths): the (B, T) mask, ``mask > 0`` (for ``where``) and the row lengths (B,)."""
    mask = groups.mask
    return mask, mask > 0, mask.sum(-1)


def _valid_mean(adv, lengths, n):
    """Σ A over the valid tokens / n, for an advantage from ``advantage_weight`` (0 on padding)."""
    return (adv[:, 0] * lengths if adv.shape[-1] == 1 else adv).sum() / n


def _log_ratio(groups, valid):
    """log π_θ − log π_old (B, T), 0 on padding (NaN or inf there included): the one ``where`` a
    ratio loss needs."""
    return masked(groups.need("policy_logprobs") - groups.need("logprobs"), valid)


class FixedAggregationParams(StageParams):
    """Parameters of a loss whose method fixes its own reduction.

    ``agg`` is declared (so a spec that sets it gets this explanation, not "unknown parameter")
    but accepts only the method's own reduction; ``loss_scale_factor`` does not exist here.
    """

    fixed_aggregation: ClassVar[str] = ""
    accepted_agg: ClassVar[tuple[str | None, ...]] = (None,)

    @field_validator("agg", mode="before", check_fields=False)
    @classmethod
    def _fixed_agg(cls, value: Any) -> Any:
        if value not in cls.accepted_agg:
            raise ValueError(f"agg cannot be set to {value!r}: {cls.fixed_aggregation}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_scale(cls, data: Any) -> Any:
        if isinstance(data, dict) and "loss_scale_factor" in data:
            raise ValueError(f"loss_scale_factor cannot be set: {cls.fixed_aggregation}")
        return data


# --- GSPO (catalog B13) -----------------------------------------------------------------------


class GspoParams(FixedAggregationParams):
    fixed_aggregation: ClassVar[str] = (
        "GSPO fixes its aggregation to seq-mean-token-mean (the paper's per-response mean; verl "
        "compute_policy_loss_gspo passes it whatever loss_agg_mode says)"
    )
    accepted_agg: ClassVar[tuple[str | None, ...]] = ("seq-mean-token-mean",)
    agg: Literal["seq-mean-token-mean"] = Field(
        "seq-mean-token-mean", description="Fixed: GSPO always aggregates with seq-mean-token-mean (verl "
        "compute_policy_loss_gspo ignores loss_agg_mode). A spec may state it; any other value is an error."
    )
    eps_low: float = Field(3e-4, ge=0, lt=1, description="Lower clip of the sequence ratio: s is kept above "
                           "1 − eps_low (GSPO paper and verl docs: 3e-4).")
    eps_high: float = Field(4e-4, ge=0, le=10, description="Upper clip of the sequence ratio: s is kept below "
                            "1 + eps_high (GSPO paper and verl docs: 4e-4).")


@stage(
    "losses.gspo",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=GspoParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Zheng et al., Group Sequence Policy Optimization, arXiv:2507.18071; as verl "
    "compute_policy_loss_gspo (GSPO-token) and TRL importance_sampling_level='sequence' (catalog B13)",
)
def gspo(advantages, groups, *, eps_low, eps_high, agg):
    """Clipped surrogate on the length-normalised sequence ratio (GSPO-token form).

        log s_i    = Σ_t m (log π_θ − log π_old) / max(|y_i|, 1)
        log s_i,t  = min(log π_θ,t − sg(log π_θ,t) + sg(log s_i), 10)
        ℓ_i,t      = max(−A s_i,t, −A clip(s_i,t, 1 − eps_low, 1 + eps_high))
        L          = seq-mean-token-mean(ℓ)      (fixed: agg accepts only this mode)

    s_i,t has the value s_i and the gradient s_i ∇log π_θ,t, so with a sequence advantage the
    loss and gradient equal TRL's full-gradient exp(mean log-ratio) form (importance_sampling_level
    "sequence"). A clipped sequence gets no gradient on any of its tokens; there is no dual clip.
    Shapes: advantages (B,) or (B, T), log-probs and mask (B, T); returns a scalar.
    Defaults: eps (3e-4, 4e-4) from the paper and verl's docs; TRL uses its epsilon (0.2) unless
    set; verl clamps log s_i,t at 10, TRL does not (same value below e^10).

    Example: one response of two tokens, log-ratios (0.1, −0.3), A = 1: log s = −0.1,
    s = 0.904837, clipped value 0.9997 → ℓ = max(−0.904837, −0.9997) = −0.904837 per token,
    L = −0.904837, ∂L/∂log π_θ,t = −A s / |y| = −0.452419 per token. With A = −1 the clip
    binds: ℓ = 0.9997 and the gradient is 0.
    """
    mask, valid, lengths = _mask_parts(groups)
    log_ratio = _log_ratio(groups, valid)  # (B, T)
    adv = advantage_weight(advantages, valid, lengths, log_ratio.dtype)  # (B, 1) or (B, T)
    seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)  # (B,); padding is already 0
    bounds = dict(negative=(1.0 - eps_low, math.inf), positive=(-math.inf, 1.0 + eps_high))  # max(−A s, −A clip(s))
    if advantages.dim() == 1:
        # one advantage per response: every token of a row has the same term −A clip(s_i), so the
        # row is one term. log s_i carries the gradient s_i/|y_i| per token (as s_i,t does) and
        # seq-mean-token-mean weighs the row by |y_i|/(|y_i| + 1e-8): B numbers, not B × T
        s = torch.exp(seq_log_ratio.clamp(max=10.0))[:, None]  # (B, 1)
        term = -adv * clamp_by_sign(s, adv, **bounds)  # (B, 1)
        out = reduce_rows(term[:, 0] * lengths, mask, agg, lengths=lengths)
        out.terms = LazyTerms(lambda: term * mask)  # per-token terms, for `replay --objective`
        return out
    log_s = (log_ratio - log_ratio.detach() + seq_log_ratio.detach()[:, None]).clamp(max=10.0)  # (B, T)
    s = clamp_by_sign(torch.exp(log_s), adv, **bounds)  # finite on padding, where A is 0
    return aggregate(s, mask, agg, weight=-adv, padding="finite", lengths=lengths)  # agg is "seq-mean-token-mean"


# --- SAPO -------------------------------------------------------------------------------------


class SapoParams(AggregationParams):
    agg: Aggregation = Field("seq-mean-token-mean", description=_AGG + " SAPO's objective (and TRL "
                             "loss_type='sapo') is the per-response mean, seq-mean-token-mean.")
    tau_pos: float = Field(1.0, gt=0, le=100, description="Gate temperature where A > 0 (paper, TRL "
                           "sapo_temperature_pos: 1.0). Larger decays the gradient faster off-policy.")
    tau_neg: float = Field(1.05, gt=0, le=100, description="Gate temperature where A ≤ 0 (paper, TRL "
                           "sapo_temperature_neg: 1.05); the paper recommends tau_neg > tau_pos.")


@stage(
    "losses.sapo",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=SapoParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Gao et al. (Qwen), Soft Adaptive Policy Optimization, arXiv:2511.20347; as TRL "
    "GRPOTrainer loss_type='sapo' (reconstructed; not in the method catalog)",
)
def sapo(advantages, groups, *, tau_pos, tau_neg, agg, loss_scale_factor):
    """Soft-gated surrogate: a sigmoid of the ratio in place of the hard clip.

        r    = exp(clamp(log π_θ − log π_old, −20, 20))
        τ    = tau_pos where A > 0, else tau_neg
        f(r) = σ(τ (r − 1)) · 4 / τ
        ℓ    = −f(r) A                 ∂ℓ/∂log π_θ = −A · 4 σ(1 − σ) · r
        L    = agg(ℓ)

    At r = 1 the gradient is exactly −A (the on-policy policy gradient); it decays smoothly as
    r leaves 1, faster for larger τ. Shapes: advantages (B,) or (B, T), log-probs and mask (B, T);
    returns a scalar. Reconstructed from the paper's description and TRL's implementation (token
    ratio, temperature by the sign of each token's advantage, per-response mean): the catalog has
    no entry, and the paper's method section was read only through secondary sources (TRL,
    ms-swift, Trinity-RFT docs, which agree). The ±20 clamp of the log-ratio is shapeflow's guard
    against inf·0; σ is already saturated there, so no representable value changes. TRL's
    per-response mean also counts empty responses (as 0) in its denominator; shapeflow's
    aggregation, like verl's, leaves them out.

    Example: A = 1, r = 1.5, τ = 1: σ(0.5) = 0.622459, f = 2.489837, ℓ = −2.489837,
    ∂ℓ/∂log π_θ = −4 · 0.622459 · 0.377541 · 1.5 = −1.410033. A = −1, r = 1.5, τ = 1.05:
    σ(0.525) = 0.628313, f = 2.393585, ℓ = 2.393585.
    """
    mask, valid, lengths = _mask_parts(groups)
    log_ratio = _log_ratio(groups, valid)
    adv = advantage_weight(advantages, valid, lengths, log_ratio.dtype)  # (B, 1) or (B, T)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))  # shaped like A
    # ℓ = −f(r) A = σ(τ(r − 1)) · (−4A/τ): the factor −4A/τ goes with A (a column for a sequence A)
    return aggregate(torch.sigmoid(tau * (ratio - 1.0)), mask, agg, loss_scale_factor, weight=-4.0 * adv / tau,
                     padding="finite", lengths=lengths)


# --- GPG (catalog B8) -------------------------------------------------------------------------


@stage(
    "losses.gpg",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=AggregationParams,
    needs=("policy_logprobs",),
    phase="update",
    paper="Chu et al., GPG: A Simple and Strong Reinforcement Learning Baseline, arXiv:2504.02546; as verl "
    "compute_policy_loss_gpg (catalog B8)",
)
def gpg(advantages, groups, *, agg, loss_scale_factor):
    """Plain policy gradient: no ratio, no clip.

        ℓ = −A log π_θ          ∂ℓ/∂log π_θ = −A
        L = agg(ℓ)

    Shapes: advantages (B,) or (B, T), log-probs and mask (B, T); returns a scalar. verl's
    default aggregation is token-mean. GPG's advantage (α·(r − μ_g), α over the whole batch) is
    an advantage stage, not part of this loss.

    Example: A = 2, log π_θ = −0.5 → ℓ = 1.0 and ∂ℓ/∂log π_θ = −2; with a second token
    A = −1, log π_θ = −2 (ℓ = −2), token-mean gives (1 − 2)/2 = −0.5.
    """
    mask, valid, lengths = _mask_parts(groups)
    logp = masked(groups.need("policy_logprobs"), valid)  # padding zeroed: no NaN value or gradient
    adv = advantage_weight(advantages, valid, lengths, logp.dtype)
    return aggregate(logp, mask, agg, loss_scale_factor, weight=-adv, padding="zero", lengths=lengths)


# --- CISPO (catalog B14) ----------------------------------------------------------------------


class CispoParams(AggregationParams):
    cap_mode: Literal["symmetric", "absolute_upper"] = Field(
        "symmetric", description="symmetric: the weight is clip(ρ, 1 − eps_low, 1 + eps_high) (verl, the "
        "MiniMax-M1 paper); absolute_upper: min(ρ, eps_high) with no lower bound, eps_high an absolute cap "
        "on ρ (TRL loss_type='cispo')."
    )
    eps_low: float | None = Field(
        None, ge=0, lt=1, description="symmetric only: the weight is kept above 1 − eps_low (none: 0.2, verl "
        "clip_ratio). Must stay none with absolute_upper, which has no lower bound."
    )
    eps_high: float | None = Field(
        None, gt=0, le=100, description="symmetric: the weight is kept below 1 + eps_high (none: 0.2, verl "
        "clip_ratio); absolute_upper: the weight is capped at eps_high itself (none: 5.0, TRL's recommendation)."
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            absolute = data.get("cap_mode") == "absolute_upper"
            if absolute and data.get("eps_low") is not None:
                raise ValueError("eps_low applies only to cap_mode = \"symmetric\"; absolute_upper (TRL) caps "
                                 "the ratio above at eps_high and has no lower bound")
            data = dict(data)
            if data.get("eps_high") is None:
                data["eps_high"] = 5.0 if absolute else 0.2
            if not absolute and data.get("eps_low") is None:
                data["eps_low"] = 0.2
        return data


@stage(
    "losses.cispo",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=CispoParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="MiniMax-M1 (CISPO), arXiv:2506.13585; as verl compute_policy_loss_cispo (symmetric) and TRL "
    "loss_type='cispo' (absolute_upper) (catalog B14)",
)
def cispo(advantages, groups, *, cap_mode, eps_low, eps_high, agg, loss_scale_factor):
    """REINFORCE weighted by a clipped, stop-gradient importance ratio.

        ρ = exp(log π_θ − log π_old)
        w = clip(exp(clamp(log ρ, −20, 20)), 1 − eps_low, 1 + eps_high)    cap_mode = symmetric (verl)
        w = min(ρ, eps_high)                                               cap_mode = absolute_upper (TRL)
        ℓ = −sg(w) A log π_θ       ∂ℓ/∂log π_θ = −w A (every token keeps a gradient)
        L = agg(ℓ)

    Shapes: advantages (B,) or (B, T), log-probs and mask (B, T); returns a scalar. Defaults:
    symmetric 0.2/0.2 (verl clip_ratio); absolute_upper eps_high = 5.0 (TRL's recommended value
    for loss_type "cispo", aggregated as a global token-mean).

    Example: A = 1, ρ = 1.5, log π_θ = −0.5. symmetric: w = 1.2, ℓ = 0.6, ∂ℓ/∂log π_θ = −1.2;
    absolute_upper (cap 5): w = 1.5, ℓ = 0.75, gradient −1.5; with ρ = 8 the cap gives w = 5.
    """
    mask, valid, lengths = _mask_parts(groups)
    logp = masked(groups.need("policy_logprobs"), valid)  # padding zeroed: no NaN value or gradient
    adv = advantage_weight(advantages, valid, lengths, logp.dtype)
    with torch.no_grad():
        ratio = torch.exp(_log_ratio(groups, valid))
        if cap_mode == "symmetric":
            # exp(clamp(log ρ, −20, 20)) is ρ clamped to [e^−20, e^20] (exp is monotone); e^20 lies
            # above every 1 + eps_high, so one clamp does both
            weight = ratio.clamp(max(1.0 - eps_low, math.exp(-20.0)), 1.0 + eps_high)
        else:
            weight = ratio.clamp(max=eps_high)
    return aggregate(weight * logp, mask, agg, loss_scale_factor, weight=-adv, padding="zero", lengths=lengths)


# --- Clip-Cov and KL-Cov (catalog B15) --------------------------------------------------------

_COV = "cov = (A − mean A)(log π_θ − mean sg(log π_θ)), both means over the valid tokens of the batch."


class ClipCovParams(AggregationParams):
    eps_low: float = Field(0.2, ge=0, lt=1, description="Lower clip: the ratio is kept above 1 − eps_low "
                           "(verl clip_ratio_low, default clip_ratio 0.2).")
    eps_high: float = Field(0.2, ge=0, le=10, description="Upper clip: the ratio is kept below 1 + eps_high "
                            "(verl clip_ratio_high, default clip_ratio 0.2).")
    cov_ratio: float = Field(2e-4, gt=0, le=1, description="Fraction of the valid tokens to detach: "
                             "n = max(int(cov_ratio · N_valid), 1) (verl clip_cov_ratio, 2e-4).")
    cov_lb: float = Field(1.0, ge=-1e6, le=1e6, description="Candidates have cov > cov_lb (verl clip_cov_lb, "
                          "1.0). " + _COV)
    cov_ub: float = Field(5.0, ge=-1e6, le=1e6, description="Candidates have cov < cov_ub (verl clip_cov_ub, "
                          "5.0).")

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if not self.cov_lb < self.cov_ub:
            raise ValueError("cov_lb must be below cov_ub")
        return self


@stage(
    "losses.clip_cov",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=ClipCovParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov), arXiv:2505.22617; as verl "
    "compute_policy_loss_clip_cov (catalog B15)",
)
def clip_cov(advantages, groups, *, eps_low, eps_high, cov_ratio, cov_lb, cov_ub, agg, loss_scale_factor):
    """PPO clip with a few random high-covariance tokens taken out of the gradient.

        ρ   = exp(log π_θ − log π_old)                  (no ±20 clamp, as verl)
        ℓ1  = −A ρ,  ℓ2 = −A clip(ρ, 1 − eps_low, 1 + eps_high)
        cov = (A − mean A)(sg(log π_θ) − mean sg(log π_θ))      means over valid tokens (÷ N + 1e-8)
        candidates: valid, cov_lb < cov < cov_ub, not clipped by PPO (ℓ2 > ℓ1 is false)
        n = max(int(cov_ratio · N_valid), 1) candidates (or all, if fewer) chosen uniformly at random
        ℓ = max(ℓ1, ℓ2) · (0 on the chosen, 1 elsewhere)        no dual clip
        L = agg(ℓ)

    The choice is verl's: the candidates in row-major order, permuted by ``torch.randperm`` on
    the global (CPU) torch generator, the first n kept. No seed parameter: the runtime seeds
    torch for each step, so a run is reproducible, and with the same seed the same tokens are
    chosen as verl would. Statistics are over the (micro-)batch the stage sees.
    Shapes: advantages (B,) or (B, T), log-probs and mask (B, T); returns a scalar.

    Example: rows A = 2 and A = −2, two tokens each, log π_θ = [[0, −4], [−5, 0]] = log π_old
    (ρ = 1, nothing clipped). mean A = 0, mean log π = −2.25, cov = [[4.5, −3.5], [5.5, −4.5]]:
    the only candidate is (0, 0) (5.5 is not below 5). n = 1, so ℓ = [[0, −2], [2, 2]] and
    token-mean L = 0.5 (plain PPO gives 0); token (0, 0) has gradient 0.
    """
    mask, valid, lengths = _mask_parts(groups)
    ratio = torch.exp(_log_ratio(groups, valid))  # 1 on padding
    adv = advantage_weight(advantages, valid, lengths, ratio.dtype)  # (B, 1) or (B, T)
    # max(ℓ1, ℓ2) = −A · (ρ clamped on the side the sign of A makes pessimistic)
    clipped = clamp_by_sign(ratio, adv, negative=(1.0 - eps_low, math.inf), positive=(-math.inf, 1.0 + eps_high),
                            zero=(-math.inf, math.inf))  # A = 0: never PPO-clipped
    with torch.no_grad():
        n_valid = lengths.sum()
        logp = masked(groups.need("policy_logprobs").detach(), valid)
        cov = (adv - _valid_mean(adv, lengths, n_valid + 1e-8)) * (logp - logp.sum() / (n_valid + 1e-8))
        # not PPO-clipped (ℓ2 > ℓ1 is false) is: the pessimistic clamp left ρ as it is
        candidate = valid & (clipped == ratio) & (cov > cov_lb) & (cov < cov_ub)
        index = torch.nonzero(candidate.reshape(-1)).squeeze(-1)  # row-major, as verl's nonzero
    taken_out = None
    if index.numel() > 0:
        n = max(int(cov_ratio * n_valid.item()), 1)
        chosen = index[torch.randperm(index.numel())[:n].to(index.device)]
        # the chosen tokens' terms −A·clip(ρ) cancelled by + A·clip(ρ): value 0, gradient exactly 0
        row, col = torch.div(chosen, mask.shape[-1], rounding_mode="floor"), chosen % mask.shape[-1]
        taken_out = (chosen, adv.expand_as(clipped)[row, col] * clipped[row, col])
    return aggregate(clipped, mask, agg, loss_scale_factor, weight=-adv, padding="finite", lengths=lengths,
                     sparse=taken_out)


class KlCovParams(AggregationParams):
    cov_ratio: float = Field(2e-4, gt=0, le=1, description="Fraction of the valid tokens that get the KL "
                             "term: k = max(1, int(N_valid · cov_ratio)) (verl kl_cov_ratio, 2e-4).")
    kl_coef: float = Field(0.1, ge=0, le=100, description="β of the |log π_θ − log π_old| penalty on the "
                           "top-k tokens (verl ppo_kl_coef: 0.1 in actor.yaml; its code falls back to 1.0 "
                           "when the key is null).")


@stage(
    "losses.kl_cov",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=KlCovParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Cui et al., The Entropy Mechanism of RL for Reasoning LMs (KL-Cov), arXiv:2505.22617; as verl "
    "compute_policy_loss_kl_cov (catalog B15)",
)
def kl_cov(advantages, groups, *, cov_ratio, kl_coef, agg, loss_scale_factor):
    """Unclipped surrogate with a |log-ratio| penalty on the highest-covariance tokens.

        ρ   = exp(log π_θ − log π_old)                  (no clamp, no clip, as verl)
        cov = (A − mean A)(sg(log π_θ) − mean sg(log π_θ))      plain means over the valid tokens
        top = the k = max(1, int(N_valid · cov_ratio)) valid tokens of largest cov (torch.topk)
        ℓ   = −A ρ + kl_coef |log π_θ − log π_old|   on top;   −A ρ elsewhere
        L   = agg(ℓ)

    Deterministic (ties in cov go as torch.topk breaks them). Statistics are over the
    (micro-)batch the stage sees. Shapes: advantages (B,) or (B, T), log-probs and mask (B, T);
    returns a scalar.

    Example: rows A = 2 and A = −2, two tokens each, log π_θ = [[0, −4], [−5, 0]], every
    log-ratio 0.1 (ρ = 1.105171): cov = [[4.5, −3.5], [5.5, −4.5]], top-1 = (1, 0), so
    ℓ = [[−2.210342, −2.210342], [2.210342 + 0.1·0.1, 2.210342]] and token-mean L = 0.0025;
    ∂ℓ/∂log π_θ at (1, 0) is 2ρ + 0.1 = 2.310342.
    """
    mask, valid, lengths = _mask_parts(groups)
    log_ratio = _log_ratio(groups, valid)  # (B, T)
    adv = advantage_weight(advantages, valid, lengths, log_ratio.dtype)  # (B, 1) or (B, T)
    penalty = None
    n_valid = int(lengths.sum(dtype=torch.float64).item())
    if n_valid > 0:
        with torch.no_grad():
            n = lengths.sum()
            logp = masked(groups.need("policy_logprobs").detach(), valid)
            cov = (adv - _valid_mean(adv, lengths, n)) * (logp - logp.sum() / n)
            cov = torch.where(valid, cov, -math.inf)  # padding is never among the top k
            top = topk_indices(cov.reshape(-1), max(1, int(n_valid * cov_ratio)))
        penalty = (top, kl_coef * log_ratio.reshape(-1)[top].abs())  # + kl_coef |log ρ| on the top k
    return aggregate(torch.exp(log_ratio), mask, agg, loss_scale_factor, weight=-adv, padding="finite",
                     lengths=lengths, sparse=penalty)


# --- GMPO (catalog README, corner cases) ------------------------------------------------------


class GmpoParams(FixedAggregationParams):
    fixed_aggregation: ClassVar[str] = (
        "GMPO reduces each response to one geometric-mean term and takes a plain mean over the rows "
        "(verl compute_policy_loss_geo_mean ignores loss_agg_mode)"
    )
    agg: None = Field(None, description="Fixed: GMPO has no aggregation mode; each response gives one "
                      "geometric-mean term and the loss is their plain mean over all rows (verl ignores "
                      "loss_agg_mode). Setting it is an error.")
    eps_low: float = Field(0.4, ge=0, le=10, description="Log-space lower clip: the token log-ratio is kept "
                           "above −eps_low on the pessimistic side (paper, TRL GMPOConfig: 0.4, ratio ≥ e^−0.4).")
    eps_high: float = Field(0.4, ge=0, le=10, description="Log-space upper clip: the token log-ratio is kept "
                            "below eps_high on the pessimistic side (paper: 0.4, ratio ≤ e^0.4).")


@stage(
    "losses.gmpo",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=GmpoParams,
    needs=("logprobs", "policy_logprobs"),
    phase="update",
    paper="Zhao et al., Geometric-Mean Policy Optimization, arXiv:2507.20673; as verl "
    "compute_policy_loss_geo_mean (loss_mode 'geo_mean')",
)
def gmpo(advantages, groups, *, eps_low, eps_high, agg):
    """Clipped surrogate on the geometric mean of the token ratios.

        Δ     = log π_θ − log π_old                              (no ±20 clamp, as verl)
        Δ̃     = sign(A) · min(sign(A) Δ, sign(A) clamp(Δ, −eps_low, eps_high))   per token
        ρ_i   = exp(Σ_t m Δ̃ / (|y_i| + 1e-8))                    geometric mean of the clipped ratios
        Ā_i   = Σ_t m A / (|y_i| + 1e-8)                          token mean of the advantage
        L     = mean over all B rows of −Ā_i ρ_i                  (fixed: agg cannot be set)

    Clipping is per token, in log space, on the pessimistic side for the sign of that token's
    advantage; a token with A = 0 contributes log-ratio 0 (but still counts in |y_i|). An empty
    row counts in the mean with term 0. Shapes: advantages (B,) or (B, T), log-probs and mask
    (B, T); returns a scalar. Defaults ε = 0.4 from the paper (TRL GMPOConfig epsilon = 0.4);
    verl reads its clip_ratio_low/high.

    Example: one row of two tokens, A = 1, Δ = (0.6, −0.2): Δ̃ = (0.4, −0.2), ρ = e^0.1 =
    1.105171, L = −1.105171; ∂L/∂log π_θ = (0, −ρ/2 = −0.552585). With A = −1 and
    Δ = (0.6, −0.6): Δ̃ = (0.6, −0.4), ρ = e^0.1, L = +1.105171.
    """
    mask, valid, lengths = _mask_parts(groups)
    delta = _log_ratio(groups, valid)  # (B, T)
    adv = advantage_weight(advantages, valid, lengths, delta.dtype)  # (B, 1) or (B, T)
    # sign(A) · min(sign(A) Δ, sign(A) clamp(Δ)) is one clamp on the pessimistic side: Δ ≤ eps_high
    # where A > 0, Δ ≥ −eps_low where A < 0 (0 stays 0: padding needs no mask)
    pessimistic = clamp_by_sign(delta, adv, negative=(-eps_low, math.inf), positive=(-math.inf, eps_high))
    if adv.shape[-1] != 1:  # a token with A = 0 contributes log-ratio 0 and no gradient
        pessimistic = torch.where(adv != 0, pessimistic, 0.0)
    # (with a sequence A, a row with A = 0 has Ā = 0: its term and gradient are 0 whatever its ratio)
    n = lengths + 1e-8  # (B,)
    ratio = torch.exp(pessimistic.sum(-1) / n)
    seq_adv = (adv[:, 0] * lengths if adv.shape[-1] == 1 else adv.sum(-1)) / n
    return row_mean(-seq_adv * ratio)


# --- entropy bonus (catalog B17) --------------------------------------------------------------


@stage(
    "losses.entropy_bonus",
    kind="loss",
    inputs={"groups": "Rollouts"},
    output="Loss",
    params=AggregationParams,
    needs=("policy_entropy",),
    phase="update",
    paper="Williams & Peng 1991 (entropy regularisation); as verl actor entropy_coeff and TRL entropy_coef "
    "(catalog B17)",
)
def entropy_bonus(groups, *, agg, loss_scale_factor):
    """The aggregated token entropy of the current policy, to subtract with a coefficient.

        H_i,t = −Σ_v π_θ(v | ·) log π_θ(v | ·)      (with gradient; need "policy_entropy")
        L     = agg(H)

    The stage returns agg(H) ≥ 0; the bonus is the spec's arithmetic:
    ``objective loss = losses.ppo_clip(adv, groups) - 0.001 * losses.entropy_bonus(groups)``
    (verl: policy_loss −= entropy_coeff · agg_loss(H, loss_agg_mode), entropy_coeff default 0;
    TRL: loss −= entropy_coef · token-mean H, default 0). Shapes: entropy and mask (B, T);
    returns a scalar.

    Example: H = [[1.0, 2.0], [0.5, pad]]: token-mean 3.5/3 = 1.166667; seq-mean-token-mean
    (1.5 + 0.5)/2 = 1.0; ∂L/∂H = 1/3 per valid token under token-mean.
    """
    mask = groups.mask
    return aggregate(groups.need("policy_entropy"), mask, agg, loss_scale_factor)  # padding excluded with `where`
