"""Token-level shaping from recent papers: UCAS, STEER and DCPO.

    ucas           UCAS: GRPO advantage × a response-certainty modifier, minus a token-certainty penalty
    losses.steer   STEER: verl's dual-clip PPO loss with per-token weights λ from the entropy-change estimate
    dcpo           DCPO: GRPO advantage mixed with a REINFORCE term towards a temperature-T target

Each stage follows the official code as the method catalogs record it (../methods catalog-a §1
for UCAS, catalog-b §4 and §5 for STEER and DCPO), including the corners where the code and
the papers' descriptions part; each docstring says where, and the parameter that gives the
other reading. The worked examples in the docstrings are the catalogs' and are the ones
tests/test_shaping_tokens.py checks.

Shapes: B responses in G groups (``groups.group_index`` (B,)), T padded tokens (``groups.mask``
(B, T), 1 on response tokens). Group statistics are scatters over the group index and batch
statistics one reduction over the (B, T) tensor: no Python loops over responses or groups.
Padding is excluded with ``where`` (a NaN or inf there reaches no value), except where a
method's code reads it on purpose (UCAS's certainty sum, documented there).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.advantages import _group_relative
from shapeflow.stdlib.functional import group_stats, masked, scope_reduce, to_tokens
from shapeflow.stdlib.losses import PpoClipParams, ppo_clip
from shapeflow.stdlib.registry import StageParams, stage

_EPS_DOC = "Added to the std before dividing (verl compute_grpo_outcome_advantage epsilon 1e-6)."


def _grpo(rewards, groups, *, norm_by_std: bool, eps: float):
    """(B,) verl's GRPO advantage: group mean, sample std + eps; μ = 0, σ = 1 for a group of one;
    exactly 0 for a group of two or more equal values (advantages.grpo's conventions)."""
    return _group_relative(rewards, groups, norm_by_std=norm_by_std, eps=eps, std="sample", scope="group",
                           baseline="mean")


def _empty(groups) -> bool:
    return groups.mask.numel() == 0


# --------------------------------------------------------------------------------------------
# UCAS (catalog-a §1)
# --------------------------------------------------------------------------------------------

_UCAS_PAPER = (
    "UCAS: Uncertainty-aware Advantage Shaping (Kuaishou), arXiv:2510.10649 (ACL 2026 Findings); "
    "code xvolcano02/UCAS verl/trainer/ppo/core_algos.py compute_ucas_advantage, _normalize_kl_certainty "
    "(catalog-a §1)"
)


class UcasParams(StageParams):
    beta_pos: float = Field(0.25, ge=0, le=100, description="β⁺: the modifier exp(−β⁺ Ĉ) of a response with "
                            "A > 0 (hard-coded 0.25 in the official function).")
    beta_neg: float = Field(0.35, ge=0, le=100, description="β⁻: the modifier exp(β⁻ Ĉ) of a response with "
                            "A ≤ 0 (hard-coded 0.35 in the official function).")
    alpha: float = Field(0.05, ge=0, le=100, description="α: weight of the token-certainty penalty −α ℓ̃ "
                         "(hard-coded 0.05 in the official function).")
    eps: float = Field(1e-6, ge=0, le=1, description=_EPS_DOC + " Also the ε of the certainty z-score, of the "
                       "min–max denominator and the 'max ≈ min' threshold of ℓ̃.")
    norm_by_std: bool = Field(True, description="Divide by the group std, both the reward advantage and the "
                              "certainty z-score (verl norm_adv_by_std_in_grpo); false is the Dr.GRPO variant.")
    certainty_mask: Literal["all", "valid"] = Field(
        "all", description="Which positions the response certainty C_i sums: all (the official code: every "
        "position of the padded row, padding included, no mask) or valid (the response tokens only)."
    )
    certainty_agg: Literal["sum", "mean"] = Field(
        "sum", description="C_i as the sum of the per-token certainty (the official code) or its mean over the "
        "positions summed (T with certainty_mask = all, |o_i| with valid)."
    )
    flat_groups: Literal["penalty", "zero"] = Field(
        "penalty", description="A group of two or more responses with equal rewards: penalty keeps the code's "
        "−α ℓ̃ on every token (A = 0 there); zero gives it 0, as GRPO does."
    )


@stage(
    "ucas",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=UcasParams,
    needs=("self_certainty", "sampled_logit"),
    paper=_UCAS_PAPER,
)
def ucas(rewards, groups, *, beta_pos, beta_neg, alpha, eps, norm_by_std, certainty_mask, certainty_agg,
         flat_groups):
    """Uncertainty-aware advantage: GRPO × a response-confidence modifier, minus a token-certainty penalty.

        A_i   = (R_i − μ_g) / (σ_g + eps)              verl GRPO (sample std; norm_by_std = false: R_i − μ_g)
        c_i,t = logsumexp_v(z/τ) − mean_v(z/τ)         need "self_certainty" (τ the rollout temperature)
        C_i   = Σ_t c_i,t                               over every position of the padded row (see below)
        Ĉ_i   = (C_i − mean_g C) / (std_g C + eps)     the same group z-score as A
        Â_i   = A_i · exp(−β⁺ Ĉ_i)   if A_i > 0
              = A_i · exp( β⁻ Ĉ_i)   if A_i ≤ 0
        ℓ_i,t = raw (pre-temperature) logit of the sampled token         need "sampled_logit"
        ℓ̃_i,t = (ℓ − min ℓ) / (max ℓ − min ℓ + eps)    min, max over the valid tokens of the whole batch;
                                                         0.5 everywhere when max − min ≤ eps
        A^UCAS_i,t = max(Â_i − α ℓ̃_i,t, 0)  if Â_i > 0      (a positive response is never flipped)
                   =     Â_i − α ℓ̃_i,t       otherwise

    Conventions of the official code (xvolcano02/UCAS @ b122ff20; catalog-a §1, established by
    running it), the defaults here:

    * C_i sums ``self_certainty`` over *all* positions of the padded row, with no mask, so the
      values at padding positions count (``certainty_mask = "valid"`` sums the response tokens
      only). verl pads every row to data.max_response_length; shapeflow's rollout pads to the
      longest response of the batch unless it is told ``pad_to = "max_new_tokens"`` (as
      specs/ucas.shape does), which gives the code's positions exactly.
    * C_i is a sum, so longer responses look "more confident" after the z-score
      (``certainty_agg = "mean"`` divides by the number of positions summed).
    * The min–max of ℓ is batch-global (all prompts), over the valid tokens: the stage runs once
      per step on the whole batch, as the code does at advantage time.
    * A group whose rewards are all equal has A = 0, so Â = 0 and every token gets −α ℓ̃ (a pure
      certainty penalty); ``flat_groups = "zero"`` gives 0 there instead.
    * A group of one response uses mean 0 and std 1 (verl), for A and for Ĉ: its Ĉ is the raw
      certainty C_i/(1 + eps).
    * Ĉ of a group whose C values are all equal is exactly 0 (a rounded mean can leave a residue
      that verl divides by std + eps; shapeflow's group helpers find equal values exactly).
    * "max ≈ min" (ℓ̃ = 0.5) is read as max − min ≤ eps; the catalog records the 0.5 but not the
      official helper's threshold.

    Shapes: rewards (B,), self_certainty and sampled_logit (B, T) → (B, T), zero on padding.

    Example (catalog-a §1; one group of G = 4, rewards [1, 0, 1, 0], lengths [3, 4, 2, 4]):
    per-token certainty rows [2, 3, 2.5], [4, 5, 4.5, 5.5], [1, 1.5], [3, 3, 3, 3] give
    C = [7.5, 19, 2.5, 12], Ĉ = [−0.3925, 1.2489, −1.1062, 0.2498], modifiers
    [1.1031, 1.5483, 1.3186, 1.0914] and Â = [0.9553, −1.3408, 1.1419, −0.9451] (A = ±0.8660).
    Sampled logits [20, 25, 18], [30, 28, 35, 22], [15, 19], [26, 24, 27, 21] span 15…35, so
    ℓ̃ of row 0 is [0.25, 0.5, 0.15]. Final advantages: row 0 [0.9428, 0.9303, 0.9478];
    row 1 [−1.3783, −1.3733, −1.3908, −1.3583]; row 2 [1.1419, 1.1319];
    row 3 [−0.9726, −0.9676, −0.9751, −0.9601].
    """
    mask = groups.mask
    if _empty(groups):
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    valid = mask > 0
    adv = _grpo(rewards, groups, norm_by_std=norm_by_std, eps=eps)  # (B,) float32
    certainty = groups.need("self_certainty").to(adv.dtype)  # (B, T)
    if certainty_mask == "valid":
        certainty = masked(certainty, valid)
    c = certainty.sum(-1)  # (B,); with "all", padding positions count (the official code)
    if certainty_agg == "mean":
        c = c / (mask.sum(-1).clamp(min=1).to(c.dtype) if certainty_mask == "valid" else float(mask.shape[-1]))
    c_hat = _grpo(c, groups, norm_by_std=norm_by_std, eps=eps)  # (B,)
    modifier = torch.where(adv > 0, torch.exp(-beta_pos * c_hat), torch.exp(beta_neg * c_hat))
    shaped = adv * modifier  # (B,) Â
    # token certainty: min–max of the raw sampled-token logit over the valid tokens of the batch
    logit = groups.need("sampled_logit").to(adv.dtype)
    lo = torch.where(valid, logit, math.inf).amin()
    hi = torch.where(valid, logit, -math.inf).amax()
    span = hi - lo  # −inf when the batch has no valid token (everything below is then masked)
    certainty_tok = torch.where(span > eps, (logit - lo) / (span.clamp(min=0) + eps), 0.5)  # (B, T) ℓ̃
    raw = shaped[:, None] - alpha * certainty_tok
    out = torch.where((shaped > 0)[:, None], raw.clamp(min=0.0), raw)
    if flat_groups == "zero":
        flat = group_stats(rewards.to(adv.dtype), groups.group_index, groups.num_groups).flat[groups.group_index]
        out = torch.where(flat[:, None], 0.0, out)
    return masked(out, valid)


# --------------------------------------------------------------------------------------------
# STEER (catalog-b §4)
# --------------------------------------------------------------------------------------------

_STEER_PAPER = (
    "Hao et al., STEER: Stabilizing Token-level Entropy-changE via Reweighting, arXiv:2510.10150; code "
    "zz-haooo/STEER verl/trainer/ppo/core_algos.py compute_token_weights, compute_policy_loss_with_entropy "
    "(loss_mode entropy_control) (catalog-b §4)"
)
_SCOPE_DOC = (
    "Which valid tokens ω_min and ω_max range over. micro (the official code's scope): the rows the stage "
    "is given, which in shapeflow's update loop is one micro-batch on one process (train.grad_accum "
    "micro-batches per minibatch). mini: the whole minibatch, every micro-batch on every process; global: "
    "the whole step's batch. Both are taken under the current weights, by a forward pass without gradient "
    "over those rows before the minibatch's first backward (mini: one extra forward over the batch per "
    "epoch; global: one over the whole batch per minibatch). With train.grad_accum = 1 and one process, mini "
    "is micro; with train.minibatches = 1 as well, global is mini."
)


class SteerParams(PpoClipParams):
    mapping: Literal["exp", "linear"] = Field(
        "exp", description="ω = |Ω| → λ. exp: λ = clamp(exp(−k ω), weight_min, 1), k = −ln(weight_min) / "
        "max(ω_max, 0.02) (the paper's form; run/run_exp.sh, linear=False). linear: λ = weight_max − (ω − ω_min)"
        "(weight_max − weight_min)/(ω_max − ω_min), clamped (run/run_linear.sh, linear=True; the function's "
        "own default)."
    )
    weight_min: float = Field(0.8, gt=0, le=10, description="λ_min, the weight of the token with the largest "
                              "|Ω| (token_weight_min: 0.8 in both run scripts; 0.95 when unset in the config).")
    weight_max: float = Field(1.2, gt=0, le=10, description="λ_max of the linear mapping, the weight of the "
                              "token with the smallest |Ω| (token_weight_max: 1.2 in run/run_linear.sh, 1.0 in "
                              "run/run_exp.sh; 1.05 when unset). The exp mapping caps λ at 1 and ignores it.")
    stats_scope: Literal["micro", "mini", "global"] = Field("micro", description=_SCOPE_DOC)

    @model_validator(mode="after")
    def _mapping_bounds(self):
        if self.mapping == "exp" and self.weight_min > 1:
            raise ValueError("the exp mapping needs weight_min <= 1 (λ = exp(−k ω) is at most 1)")
        if self.mapping == "linear" and self.weight_min > self.weight_max:
            raise ValueError("the linear mapping needs weight_min <= weight_max")
        return self


def steer_weights(advantages, entropy, old_logprobs, logprobs, mask, *, mapping: str = "exp",
                  weight_min: float = 0.8, weight_max: float = 1.2):
    """STEER's per-token weights λ (B, T), without gradient; 0 on padding (compute_token_weights).

        x   = clamp(exp(log π_θ), 1e-8, 1 − 1e-8)          current policy, detached
        Ω   = A / clamp(exp(log π_old), 1e-8, 1) · x (1 − x) · (ln x + H)      H: behaviour entropy
        ω   = |Ω|  (a non-finite Ω counts as 0, as the code)     ω_min, ω_max over the valid tokens given
        exp:    λ = clamp(exp(−k ω), λ_min, 1),   k = −ln λ_min / max(ω_max, 0.02)
        linear: λ = clamp(λ_max − (ω − ω_min)(λ_max − λ_min)/(ω_max − ω_min), λ_min, λ_max);
                (λ_min + λ_max)/2 everywhere when ω_max = ω_min

    ``advantages`` (B,) or (B, T); ``entropy``, ``old_logprobs``, ``logprobs`` and ``mask`` (B, T).
    Statistics are over the valid tokens of the tensors given (the code's micro-batch), or over
    the loss's statistics scope when the update loop runs it for a wider one (``scope_reduce``).

    Example (catalog-b §4): A = [[1, 1, 1, 1], [−1, −1, −1, 0]], p_old = p_θ =
    [0.9, 0.5, 0.2, 0.05 | 0.9, 0.5, 0.2, 0.3], H = [0.3, 1.2, 2.0, 2.5 | 0.3, 1.2, 2.0, 1.0], the
    last token of row 2 padding: ω = [0.0195, 0.2534, 0.3124, 0.4709 | 0.0195, 0.2534, 0.3124, –];
    exp (λ_min 0.8): [0.991, 0.887, 0.862, 0.800 | 0.991, 0.887, 0.862, 0];
    linear (0.8–1.2): [1.2, 0.993, 0.940, 0.8 | 1.2, 0.993, 0.940, 0].
    """
    valid = mask > 0
    with torch.no_grad():
        logp = masked(logprobs.detach(), valid)
        dtype = logp.dtype if logp.is_floating_point() else torch.float32
        adv = to_tokens(advantages.detach(), mask).to(dtype)
        x = torch.exp(logp.to(dtype)).clamp(1e-8, 1.0 - 1e-8)
        old = torch.exp(masked(old_logprobs.detach(), valid).to(dtype)).clamp(1e-8, 1.0)
        h = masked(entropy.detach(), valid).to(dtype)
        omega = adv / old * (x * (1.0 - x)) * (torch.log(x) + h)
        omega = torch.where(valid & torch.isfinite(omega), omega, 0.0).abs()  # (B, T)
        lo = torch.where(valid, omega, math.inf).amin() if omega.numel() else omega.new_full((), math.inf)
        hi = torch.where(valid, omega, -math.inf).amax() if omega.numel() else omega.new_full((), -math.inf)
        lo, hi = scope_reduce("steer.omega_min", lo, "min"), scope_reduce("steer.omega_max", hi, "max")
        if mapping == "exp":
            k = -math.log(weight_min) / hi.clamp(min=0.02)
            weights = torch.exp(-k * omega).clamp(weight_min, 1.0)
        elif mapping == "linear":
            span = hi - lo
            slope = (weight_max - weight_min) / span.clamp(min=torch.finfo(dtype).tiny)
            spread = (weight_max - slope * (omega - lo)).clamp(weight_min, weight_max)
            weights = torch.where(span > 0, spread, 0.5 * (weight_min + weight_max))
        else:
            raise ValueError(f"unknown mapping {mapping!r}")
        return torch.where(valid, weights, 0.0)


@stage(
    "losses.steer",
    kind="loss",
    inputs={"advantages": "Advantage[tok]", "groups": "Rollouts"},
    output="Loss",
    params=SteerParams,
    needs=("logprobs", "policy_logprobs", "entropy"),
    phase="update",
    scope_param="stats_scope",
    paper=_STEER_PAPER,
)
def steer(advantages, groups, *, mapping, weight_min, weight_max, stats_scope, eps_low, eps_high, clip_c, agg,
          loss_scale_factor):
    """verl's dual-clip PPO loss with each token's term weighted by STEER's λ (detached).

        ℓ_t = ppo_clip's per-token term (ρ clamped at ±20 in log space, clip eps_low/eps_high,
              dual clip c where A < 0)                      (losses.ppo_clip, catalog B12)
        λ_t = steer_weights(A, H_old, log π_old, sg(log π_θ))          (see steer_weights)
        L   = agg(λ_t · ℓ_t)

    λ > 0 on every valid token, so λ·ℓ(A) = ℓ(λA) term by term (the clip bounds depend only on the
    sign of A): the stage calls losses.ppo_clip with the advantage λA, same value and gradient.
    Conventions of the official code (zz-haooo/STEER @ b31df716), followed here:

    * H is the *behaviour* policy's full-vocabulary entropy (need "entropy", computed with the old
      log-probs), x the *current* policy's probability of the sampled token (no gradient): the code
      mixes the two; the paper's derivation is at the current point.
    * ω_min and ω_max are statistics of the micro-batch (stats_scope = micro), so the weights
      change with the micro-batch size (the release: 8 responses per GPU micro-batch); mini and
      global take them over the minibatch or the whole batch (the paper's reading).
    * λ multiplies the already clipped / dual-clipped term; padding gets λ = 0.

    Parameters as the function's defaults (clip 0.2/0.2, clip_c 3, token-mean); the release's run
    scripts use clip 0.2/0.28 and clip_ratio_c 10, which specs/steer.shape sets.
    Shapes: advantages (B,) or (B, T), log-probs, entropy and mask (B, T); returns a scalar.

    Example: the weights of steer_weights' example with log π_θ = log π_old (ρ = 1) give per-token
    terms −A·λ, so with the exp mapping and token-mean L = −(0.991 + 0.887 + 0.862 + 0.800
    − 0.991 − 0.887 − 0.862)/7 = −0.1143.
    """
    mask = groups.mask
    weights = steer_weights(advantages, groups.need("entropy"), groups.need("logprobs"),
                            groups.need("policy_logprobs"), mask, mapping=mapping, weight_min=weight_min,
                            weight_max=weight_max)
    weighted = to_tokens(advantages, mask).to(weights.dtype) * weights  # (B, T), 0 on padding
    return ppo_clip(weighted, groups, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, agg=agg,
                    loss_scale_factor=loss_scale_factor)


# --------------------------------------------------------------------------------------------
# DCPO (catalog-b §5)
# --------------------------------------------------------------------------------------------

_DCPO_PAPER = (
    "Li et al., DCPO: Distribution-Centric Policy Optimization, arXiv:2601.12730; code 597358816/DCPO "
    "verl/trainer/ray_trainer.py (the alg == 'DCPO' branch of fit) (catalog-b §5)"
)


def logprobs_at(temperature: float) -> str:
    """The need holding the behaviour log-probs at ``temperature`` (as the checker names it)."""
    return f"logprobs@{float(temperature):g}"


class DcpoParams(StageParams):
    entropy_base: float = Field(0.5, ge=0, le=100, description="H_0: the target of the sampled-token NLL "
                                "(trainer.entropy_base: 0.5 in the script; the README's best for Qwen2.5-Math-7B "
                                "is 0.25, ablated over 0.25/0.5/0.75/1.0).")
    t_high: float = Field(1.2, gt=0, le=100, description="T when H_prev ≤ H_0 (hard-coded 1.2; the config keys "
                          "temperature_high/low are read only by AEPO).")
    t_low: float = Field(0.8, gt=0, le=100, description="T when H_prev > H_0 (hard-coded 0.8).")
    alpha_cap: float = Field(0.1, ge=0, le=100, description="Cap on |H_0 − H_prev| before the division by p̂: "
                             "α' = min(|H_0 − H_prev|, alpha_cap)/p̂ (hard-coded 0.1).")
    correct_threshold: float = Field(0.05, ge=-1e6, le=1e6, description="A response counts as correct when its "
                                     "reward is above this (b_i = 1[R_i > 0.05], _compute_bool_reward_by_score).")
    eps: float = Field(1e-6, ge=0, le=1, description=_EPS_DOC)
    norm_by_std: bool = Field(True, description="Divide the GRPO advantage by the group std; false gives "
                              "R − μ (Dr.GRPO).")


@stage(
    "dcpo",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=DcpoParams,
    needs=("logprobs", "logprobs@{t_high}", "logprobs@{t_low}"),
    state={
        "entropy": "H_prev for the next step: −masked_mean of this step's behaviour log-probs (the code's "
                   "actor/entropy_loss); 0 before the first step",
        "temperature": "T used at the last step (t_high when H_prev ≤ H_0, else t_low)",
        "alpha": "α used at the last step",
    },
    paper=_DCPO_PAPER,
)
def dcpo(rewards, groups, *, entropy_base, t_high, t_low, alpha_cap, correct_threshold, eps, norm_by_std, state):
    """GRPO advantage mixed with a REINFORCE term towards the old policy at temperature T.

        A_i   = verl GRPO advantage (group mean, sample std + eps)
        T     = t_high if H_prev ≤ H_0 else t_low          H_prev: the previous step's NLL (state)
        b_i   = 1[R_i > correct_threshold]
        ρ^T   = exp(log π_old^(T)(y_t) − log π_old(y_t))    π^(T) = softmax(z/T); needs "logprobs@T"
        p̂     = (1/B) Σ_i b_i                                the whole batch
        α'    = min(|H_0 − H_prev|, alpha_cap) / p̂,   α = α'/(1 + α')      (α = 0 when p̂ = 0)
        Ã_i,t = (1 − α) A_i + α b_i ρ^T_i,t                 zero on padding
        H     = −Σ m log π_old / (Σ m + 1e-8)               stored as the next step's H_prev

    The loss is the unchanged PPO clip (EasyR1: clip 0.2/0.2, dual clip 3, token-mean), so the
    regulariser is weighted by ρ^T and the policy ratio ρ ("double importance sampling").
    Both temperatures' log-probs are declared as needs and computed by the behaviour pass; the
    stage reads the one the step's T picks.

    Conventions of the official code (597358816/DCPO @ 33f8073e; catalog-b §5), followed here:

    * The "entropy" that picks T is the mean NLL of the sampled tokens, not the full-vocabulary
      entropy; T is a step function of it (H_prev = H_0 gives t_high); before the first step it
      is 0, so the first step uses t_high and α' = min(H_0, cap)/p̂.
    * The regulariser is folded into a convex mix with the GRPO advantage (the paper may use a
      separate coefficient); b_i and ρ^T come from the whole batch, p̂ over all B responses.
    * p̂ = 0 divides by zero in the code (α = NaN); here α = 0 (pure GRPO for that step).

    Where shapeflow measures H_prev: the code takes the previous update's ``actor/entropy_loss``,
    the mean over that update's micro-batches of −masked_mean(log π_θ) under the policy being
    updated. Here it is −masked_mean of the behaviour log-probs of the batch this stage sees,
    stored for the next step: the same number for one on-policy update per rollout in one
    micro-batch (train.minibatches = train.grad_accum = 1); with several micro-batches the code
    averages per-micro-batch means (here one token mean over the batch), and with several
    minibatches or epochs the code's value comes from the policy as it is being updated, here
    from the policy that sampled the batch. The code computes the base log-probs at temperature
    1 (``_compute_old_log_probs``) and samples at rollout temperature 1.0; shapeflow's
    ``logprobs`` are at the rollout temperature, so use temperature 1 for the same ρ^T.

    Shapes: rewards (B,), log-probs (B, T) → (B, T).

    Example (catalog-b §5): H_prev = 0.30, H_0 = 0.5 → T = 1.2; one group with rewards
    [1, 0, 0, 1]: p̂ = 0.5, α' = min(0.2, 0.1)/0.5 = 0.2, α = 0.2/1.2 = 0.1667, A = ±0.8660.
    A correct response with ρ^T = [0.917, 0.944, 1.1] gets Ã = 0.8333·0.866 + 0.1667·ρ^T =
    [0.874, 0.879, 0.905]; an incorrect one gets 0.8333·(−0.866) = −0.722 on every token.
    """
    mask = groups.mask
    valid = mask > 0
    h_prev = float(state.setdefault("entropy", 0.0))
    temperature = t_high if h_prev <= entropy_base else t_low
    logp = masked(groups.need("logprobs"), valid)  # (B, T), 0 on padding
    n_tok = mask.sum()
    # H for the next step: the mean NLL of this batch's sampled tokens (verl/EasyR1 masked_mean)
    state["entropy"] = float(-(logp * mask).sum() / (n_tok + 1e-8)) if mask.numel() else 0.0
    state["temperature"] = float(temperature)
    if _empty(groups):
        state["alpha"] = 0.0
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    adv = _grpo(rewards, groups, norm_by_std=norm_by_std, eps=eps)  # (B,) float32
    correct = (rewards.to(adv.dtype) > correct_threshold).to(adv.dtype)  # (B,) b_i
    p_hat = float(correct.mean())
    gap = min(abs(entropy_base - h_prev), alpha_cap)
    if p_hat > 0:
        ratio = gap / p_hat
        alpha = ratio / (1.0 + ratio)
    else:  # the code divides by zero here (α = NaN)
        alpha = 0.0
    state["alpha"] = alpha
    logp_t = masked(groups.need(logprobs_at(temperature)), valid)
    rho = torch.exp(logp_t - logp)  # (B, T), 1 on padding
    mixed = (1.0 - alpha) * adv[:, None] + alpha * correct[:, None] * rho
    return masked(mixed, valid)
