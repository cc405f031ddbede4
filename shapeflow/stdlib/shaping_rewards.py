"""Reward shaping from recent papers (issue 5): preference-as-reward and its baselines, novelty
sharpening, position bonuses, ranking rewards for failed responses.

Each stage is one small function over tensors, with its formula, paper and official-code
conventions in the docstring (see ../methods catalogs a, b and c).

* PAR and the reward-shaping baselines it compares (catalog A §11; confidence H: equations
  from PorUna-byte/PAR ``trainers/reward_shaper.py``, with its corner cases): ``par.*``.
  The running-statistics baselines (Meanstd, Clip, Minmax) carry state across steps; they are
  pure functions here (:func:`running_stats_update` and friends), waiting for the runtime's
  stage-state contract.
* XRPO's novelty sharpening (catalog B §3.2, confidence L): ``xrpo.novelty_sharpen``.
* ASPO's clipped early-tool-call advantage bonus, paper Eq. (2), and the rejected reward
  variant, Eq. (1) (catalog C §1, confidence M): ``aspo.*``.
* R³'s structural-entropy ranking reward and its length reward (catalog B §3.7, confidence M):
  ``r3.*``.

Shapes: B responses in G groups (``groups.group_index`` (B,)), T padded tokens
(``groups.mask`` (B, T)). A sequence value is (B,). Group statistics are scatters over the
group index or a padded (G, n) layout of the groups, never Python loops; the only per-response
Python work is finding a marker in decoded text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from shapeflow._record import Record, record
from shapeflow._lazy import torch
from shapeflow.stdlib.functional import group_min_max, group_sum
from shapeflow.stdlib.registry import StageParams, stage

PAR_PAPER = ("Fu et al., Reward Shaping to Mitigate Reward Hacking in RLHF (PAR), arXiv:2502.18770; "
             "official code PorUna-byte/PAR trainers/reward_shaper.py (catalog A §11)")
XRPO_PAPER = ("Bamba et al., XRPO: eXplore-eXploit GRPO, arXiv:2510.06672, Eq. (6) (novelty-guided "
              "advantage sharpening); reconstructed, no official code read (catalog B §3.2, catalog C §2)")
ASPO_PAPER = ("Lin & Xu, Understanding Tool-Integrated Reasoning (ASPO), arXiv:2508.19201, §3.3 Eq. ({eq}); "
              "reconstructed from the paper text, no official code (catalog A §4, catalog C §1)")
R3_PAPER = ("Jiang et al., R³: Replay, Reflection and Ranking rewards, arXiv:2601.19620, §3; "
            "reconstructed from the paper text, no official code (catalog B §3.7)")

_REFS_DOC = (
    "The references of a response are the values of ``ref_rewards`` on the first M responses of "
    "its group, in batch order: response j of a group carries the reward of the prompt's j-th "
    "reference response. A value repeated on every response of a group is one reference."
)


# --------------------------------------------------------------------------------------------
# group layout helpers
# --------------------------------------------------------------------------------------------


def group_slots(index, num_groups: int):
    """(B,) position of each response within its group, in batch order, and the size of the
    largest group. ``index`` (B,) is the group of each response."""
    B = index.numel()
    if B == 0:
        return index.new_zeros(0), 0
    order = torch.argsort(index, stable=True)  # groups in order, batch order within a group
    counts = torch.bincount(index, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    pos = torch.empty_like(index)
    pos[order] = torch.arange(B, device=index.device) - starts[index[order]]
    return pos, int(counts.max())


def to_slots(x, index, pos, num_groups: int, width: int, fill: float = 0.0):
    """(G, width) layout of ``x`` (B,): x_i at [group_i, pos_i] where pos_i < width, ``fill``
    elsewhere."""
    out = torch.full((num_groups, width), fill, dtype=x.dtype, device=x.device)
    keep = pos < width
    out[index[keep], pos[keep]] = x[keep]
    return out


def _references(ref_rewards, groups, max_refs: int | None):
    """(B, M) reference rewards of each response's prompt and (B, M) which of them exist.

    The references of a group are ``ref_rewards`` on its first M = min(max_refs, n_g)
    responses in batch order (all of them when ``max_refs`` is None)."""
    index, G = groups.group_index, groups.num_groups
    pos, n_max = group_slots(index, G)
    width = n_max if max_refs is None else min(max_refs, n_max)
    ref = ref_rewards.to(torch.float32)
    refs = to_slots(ref, index, pos, G, width)[index]  # (B, M)
    valid = to_slots(torch.ones_like(ref), index, pos, G, width)[index] > 0  # (B, M)
    return refs, valid


def _mean_over_refs(values, valid):
    """(B,) mean of ``values`` (B, M) over the valid references (padding excluded with where)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum(-1) / valid.sum(-1).clamp(min=1)


# --------------------------------------------------------------------------------------------
# PAR's bounded transforms (official helpers)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def fitted_poly_coefficients() -> tuple[float, ...]:
    """(a, b, c, d, e, f) of a·x⁵ + b·x⁴ + c·x³ + d·x² + e·x + f, the least-squares fit of the
    logistic σ(x) on 100 evenly spaced points of [−5, 5] (the code's ``curve_fit`` of the same
    model; its Levenberg–Marquardt fit gives values within 1e-6 of this exact least-squares one)."""
    x = torch.linspace(-5.0, 5.0, 100, dtype=torch.float64)
    design = torch.stack([x**p for p in (5, 4, 3, 2, 1, 0)], -1)  # (100, 6)
    solution = torch.linalg.lstsq(design, torch.sigmoid(x)[:, None]).solution[:, 0]
    return tuple(solution.tolist())


def fitted_poly(x):
    """The code's piecewise polynomial sigmoid: 0 for x ≤ −5, 1 for x ≥ 5, the fitted
    fifth-order polynomial in between."""
    y = torch.zeros_like(x)
    for c in fitted_poly_coefficients():  # Horner
        y = y * x + c
    return torch.where(x <= -5, torch.zeros_like(x), torch.where(x >= 5, torch.ones_like(x), y))


def _bounded(x, fn: str, k: float = 1.0):
    if fn == "sigmoid":
        return torch.sigmoid(k * x)
    if fn == "tanh":
        return torch.tanh(x)
    if fn == "arctan":
        return torch.atan(x)
    if fn == "fitted_poly":
        return fitted_poly(x)
    raise ValueError(f"unknown transform {fn!r}")


# --------------------------------------------------------------------------------------------
# par.preference (PAR), par.sgfc, par.centered, par.relative
# --------------------------------------------------------------------------------------------


def _max_refs_field():
    return Field(
        10, ge=1, le=1_000_000,
        description="M: at most this many references per prompt, the first ones of the group "
        "(code reward_maxref = 10; the paper reports one reference already suffices).",
    )


class PreferenceParams(StageParams):
    k: float = Field(1.0, gt=0, le=100, description="The sigmoid's slope k (code sigmoid_k = 1).")
    max_refs: int = _max_refs_field()


@stage(
    "par.preference",
    kind="reward",
    inputs={"rewards": "Signal[seq]", "ref_rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=PreferenceParams,
    paper=PAR_PAPER,
)
def preference(rewards, ref_rewards, groups, *, k, max_refs):
    """PAR, Preference As Reward: the sigmoid of the reward against reference rewards.

        r_RL,i = (1/M) Σ_{m=1..M} σ( k·(r_i − r_ref,m) ),     σ the logistic function

    The mean over references of the probability (Bradley–Terry) that response i beats the
    m-th reference response of its prompt. ``ref_rewards`` are the rewards of reference
    responses to the same prompt: in the paper, responses sampled offline from the SFT policy
    and scored by the same reward model. The references of a response are the values of
    ``ref_rewards`` on the first M = min(max_refs, n_g) responses of its group, in batch
    order: response j of a group carries the reward of the prompt's j-th reference response
    (the code takes the first ``reward_maxref`` of each prompt's stored list). A value
    repeated on every response of a group is a single reference. Wire it from recorded
    scores, ``rewards.recorded(groups, key = "ref_reward")``, or from the reward of the
    task's reference answer, ``verifiers.exact_answer(rollouts.reference_answers(groups))``.

    Conventions (PorUna-byte/PAR ``calculate_relative_sigmoid``, flags ``--reward_sigmoid
    --reward_relative``): k = 1, M = 10. Bounded in (0, 1); r_i = r_ref gives 0.5. Shapes:
    rewards (B,), ref_rewards (B,) → (B,). A group whose rewards and references are all equal
    gives σ(0) = 0.5 on every response (a following grpo makes that 0).

    Example (catalog A §11): r = 2.0 and 0.5 against references [1, 1.5, 0.5] give
    [0.7237, 0.3822]; r = −1.0 against [0, −0.5, 0.2] gives 0.2927; r = 4.0 against
    [1, 2, 3] gives 0.8548.
    """
    refs, valid = _references(ref_rewards, groups, max_refs)
    r = rewards.to(torch.float32)
    return _mean_over_refs(torch.sigmoid(k * (r[:, None] - refs)), valid)


class SgfcParams(StageParams):
    k: float = Field(1.0, gt=0, le=100, description="The sigmoid's slope k (code sigmoid_k = 1).")
    shift: float = Field(3.0, ge=-1000, le=1000, description="The shift s subtracted from the reward "
                         "(the code hard-codes 3).")
    max_refs: int = _max_refs_field()


@stage(
    "par.sgfc",
    kind="reward",
    inputs={"rewards": "Signal[seq]", "ref_rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=SgfcParams,
    paper=PAR_PAPER,
)
def sgfc(rewards, ref_rewards, groups, *, k, shift, max_refs):
    """SgFc ("slow growth, fast convergence"), PAR's ablation: the PAR sigmoid shifted right.

        r_RL,i = (1/M) Σ_{m=1..M} σ( k·(r_i − s − r_ref,m) ),     s = 3

    The code's ``--reward_sgfc``: ``calculate_relative_sigmoid(reward − 3, refs)``, so the
    reward sits on the slow-growing tail of the sigmoid until it clears the references by s.
    References as par.preference (the first M of the group's ``ref_rewards``). Shapes: (B,)
    → (B,). An all-equal group gives σ(−k·s) on every response (0.0474 with the defaults).

    Example: r = 2.0 against references [1, 1.5, 0.5] gives (σ(−2) + σ(−2.5) + σ(−1.5))/3
    = 0.1258.
    """
    refs, valid = _references(ref_rewards, groups, max_refs)
    r = rewards.to(torch.float32)
    return _mean_over_refs(torch.sigmoid(k * (r[:, None] - shift - refs)), valid)


class CenteredParams(StageParams):
    max_refs: int = _max_refs_field()


@stage(
    "par.centered",
    kind="reward",
    inputs={"rewards": "Signal[seq]", "ref_rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=CenteredParams,
    paper=PAR_PAPER,
)
def centered(rewards, ref_rewards, groups, *, max_refs):
    """PAR's "Centered" baseline: the reward minus the mean reference reward.

        r_RL,i = (1/M) Σ_{m=1..M} (r_i − r_ref,m)

    The code's ``--reward_centered`` (``calculate_centered``). Unbounded; references as
    par.preference (the first M of the group's ``ref_rewards``). Shapes: (B,) → (B,). A group
    whose rewards equal its references gives 0.

    Example (catalog A §11): r = [2.0, 0.5] against [1, 1.5, 0.5] give [1.0, −0.5]; −1.0
    against [0, −0.5, 0.2] gives −0.9; 4.0 against [1, 2, 3] gives 2.0.
    """
    refs, valid = _references(ref_rewards, groups, max_refs)
    r = rewards.to(torch.float32)
    return _mean_over_refs(r[:, None] - refs, valid)


class RelativeParams(StageParams):
    fn: Literal["tanh", "arctan", "fitted_poly"] = Field(
        description="The bounded function f: tanh (code --reward_tanh --reward_relative), fitted_poly "
        "(--reward_fittedpoly --reward_relative: the fifth-order polynomial fit of the sigmoid on "
        "[−5, 5], 0 below and 1 above), arctan (the code has the helper but no flag). Required."
    )
    max_refs: int = _max_refs_field()


@stage(
    "par.relative",
    kind="reward",
    inputs={"rewards": "Signal[seq]", "ref_rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=RelativeParams,
    paper=PAR_PAPER,
)
def relative(rewards, ref_rewards, groups, *, fn, max_refs):
    """PAR's sigmoid-like baselines relative to references: tanh, arctan or a fitted polynomial.

        r_RL,i = (1/M) Σ_{m=1..M} f(r_i − r_ref,m),     f ∈ {tanh, arctan, fitted_poly}

    fitted_poly(x) = 0 for x ≤ −5, 1 for x ≥ 5, a·x⁵ + … + f in between, the least-squares
    fifth-order fit of σ on 100 points of [−5, 5] (a = 2.0267e-4, c = −1.0131e-2, e = 0.22879,
    f = 0.5; b = d = 0). No slope k: the code applies it to the sigmoid only (use
    par.preference for the sigmoid). References as par.preference. Shapes: (B,) → (B,). A
    group whose rewards equal its references gives f(0): 0 for tanh and arctan, 0.5 for
    fitted_poly.

    Example (catalog A §11, tanh): r = [2.0, 0.5] against [1, 1.5, 0.5] give [0.7096, −0.4079];
    −1.0 against [0, −0.5, 0.2] gives −0.6858; 4.0 against [1, 2, 3] gives 0.9069.
    """
    refs, valid = _references(ref_rewards, groups, max_refs)
    r = rewards.to(torch.float32)
    return _mean_over_refs(_bounded(r[:, None] - refs, fn), valid)


# --------------------------------------------------------------------------------------------
# par.bounded (no reference), par.lsc, par.length_penalty, par.ceil
# --------------------------------------------------------------------------------------------


class BoundedParams(StageParams):
    fn: Literal["sigmoid", "tanh", "arctan", "fitted_poly"] = Field(
        description="The bounded function f: sigmoid (code --reward_sigmoid without --reward_relative), "
        "tanh (--reward_tanh), fitted_poly (--reward_fittedpoly), arctan (helper without a flag). Required."
    )
    k: float = Field(1.0, gt=0, le=100, description="The sigmoid's slope k (code sigmoid_k = 1); the other "
                     "functions ignore it, as the code does.")


@stage(
    "par.bounded",
    kind="reward",
    inputs={"rewards": "Signal[seq]"},
    output="Signal[seq]",
    params=BoundedParams,
    paper=PAR_PAPER,
)
def bounded(rewards, *, fn, k):
    """PAR's reference-free bounded baselines: a sigmoid-like function of the raw reward.

        r_RL,i = σ(k·r_i)  |  tanh(r_i)  |  arctan(r_i)  |  fitted_poly(r_i)

    The code's ``calculate_sigmoid`` / ``calculate_tanh`` / ``calculate_arctan`` /
    ``calculate_fitted_poly`` (fitted_poly as in par.relative). No references, no groups.
    Shapes: (B,) → (B,).

    Example (catalog A §11, sigmoid): r = [2.0, 0.5, −1.0, 4.0] give [0.8808, 0.6225, 0.2689,
    0.9820].
    """
    return _bounded(rewards.to(torch.float32), fn, k)


class LscParams(StageParams):
    quantile: float = Field(0.85, gt=0, lt=1, description="q: the reference quantile r_q is the q-quantile "
                            "of N(mean, std) of the references (code 0.85).")
    scale_eps: float = Field(1e-5, ge=0, le=1, description="Added to the references' std before the quantile "
                             "(code 1e-5, scipy norm.ppf(q, loc, scale = std + 1e-5)).")
    max_refs: int | None = Field(
        None, ge=1, le=1_000_000,
        description="none: every reference of the group, as the code does (it ignores reward_maxref); "
        "a number: only the first ones (the reading that honours reward_maxref).",
    )


@stage(
    "par.lsc",
    kind="reward",
    inputs={"rewards": "Signal[seq]", "ref_rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=LscParams,
    paper=PAR_PAPER,
)
def lsc(rewards, ref_rewards, groups, *, quantile, scale_eps, max_refs):
    """PAR's log-sigmoid-centred baseline (LSC): log σ of the reward above a high reference quantile.

        μ, s  = mean and sample std of the references   (s = 0 for a single reference)
        r_q   = μ + Φ⁻¹(q)·(s + 1e-5)                     (q = 0.85: Φ⁻¹(q) = 1.03643)
        r_RL  = log σ(r − r_q)

    The code's ``--reward_lsc``, with its corner cases: it uses **all** references of the
    prompt (``reward_maxref`` ignored; ``max_refs`` = none), and its sample std divides by
    n − 1 only when n > 1, so a single reference has std 0 and the quantile's scale is 1e-5.
    References as par.preference otherwise: the values of ``ref_rewards`` over the group.
    log σ is computed as ``logsigmoid`` (the code's log(sigmoid(x)) is −inf below about
    x = −88 in float32; the two agree wherever the code is finite). Shapes: (B,) → (B,);
    always < 0.

    Example (catalog A §11): r = [2.0, 0.5] against [1, 1.5, 0.5] (μ = 1, s = 0.5, r_q =
    1.51823) give [−0.4810, −1.3266]; −1.0 against [0, −0.5, 0.2] gives −1.5204; 4.0 against
    [1, 2, 3] gives −0.3232. A single reference 1.0 and r = 1.0: log σ(−1.03643e-5) = −0.69315.
    """
    refs, valid = _references(ref_rewards, groups, max_refs)
    n = valid.sum(-1).to(torch.float32)  # (B,)
    zero = torch.zeros_like(refs)
    mean = torch.where(valid, refs, zero).sum(-1) / n.clamp(min=1)
    d = torch.where(valid, refs - mean[:, None], zero)
    std = ((d * d).sum(-1) / torch.where(n > 1, n - 1, torch.ones_like(n))).sqrt()
    z = torch.special.ndtri(torch.tensor(quantile, dtype=torch.float64)).item()
    r_q = mean + z * (std + scale_eps)
    return torch.nn.functional.logsigmoid(rewards.to(torch.float32) - r_q)


class LengthPenaltyParams(StageParams):
    threshold: int = Field(300, ge=0, le=10_000_000, description="L₀: responses longer than this many tokens "
                           "are penalised (code gen_valid_len = 300).")
    coef: float = Field(0.01, ge=0, le=100, description="The penalty per token beyond L₀ (code len_penalty = "
                        "0.01).")


@stage(
    "par.length_penalty",
    kind="reward",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=LengthPenaltyParams,
    paper=PAR_PAPER,
)
def length_penalty(groups, *, threshold, coef):
    """PAR's length penalty, to add to the raw reward before shaping (on by default in the code).

        pen_i = −coef · (|y_i| − L₀)    where |y_i| > L₀,   0 otherwise

    |y_i| counts response tokens (``groups.mask``). The code (``reward_penalize_length`` =
    True, unless the ODIN reward model is used) subtracts it from the policy's reward before
    any other transform and never from the references, so a spec writes
    ``(r + par.length_penalty(groups)) |> par.preference(ref, groups)``.

    Example (catalog A §11): responses of 310 tokens with rewards [2.0, 0.5, −1.0, 4.0] end
    at [1.9, 0.4, −1.1, 3.9] (penalty −0.1 each); 300 tokens or fewer: 0.
    """
    lengths = groups.mask.sum(-1).to(torch.float32)  # (B,)
    return (threshold - lengths).clamp(max=0) * coef  # 0.0 (not −0.0) within the limit


class CeilParams(StageParams):
    ceil: float = Field(ge=-1e9, le=1e9, description="r_ceil, the largest reward kept (code reward_ceil; "
                        "none there, i.e. off, by default). Required.")


@stage(
    "par.ceil",
    kind="reward",
    inputs={"rewards": "Signal[seq]"},
    output="Signal[seq]",
    params=CeilParams,
    paper=PAR_PAPER,
)
def ceil(rewards, *, ceil):
    """PAR's optional reward ceiling: r_RL,i = min(r_i, r_ceil).

    The code's ``reward_ceil`` (off by default), applied first and again after the running
    normalisations. Shapes: (B,) → (B,). Example: ceiling 1.0 on [2.0, 0.5] gives [1.0, 0.5].
    """
    return rewards.to(torch.float32).clamp(max=ceil)


# --------------------------------------------------------------------------------------------
# PAR's running-statistics baselines: pure functions until stages can keep state
# --------------------------------------------------------------------------------------------


@record
class RunningStats(Record):
    """The running statistics of every reward seen so far (the code's ``RunningStats``).

    ``n`` rewards, their mean, M2 = Σ (x − mean)², and their max and min. The initial max and
    min are the code's sentinels −10000 and +10000 (so rewards all above 10000 never move the
    min); the variance is the population variance M2/n, and 0 while n ≤ 1."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    max: float = -10000.0
    min: float = 10000.0

    @property
    def variance(self) -> float:
        return self.m2 / self.n if self.n > 1 else 0.0

    @property
    def std(self) -> float:
        return self.variance**0.5


def running_stats_update(state: RunningStats, rewards) -> RunningStats:
    """The state after seeing ``rewards`` (B,): Chan et al.'s merge of the batch's mean and
    population variance into the running ones, in float64 as the code (``.item()``) does."""
    r = rewards.detach().to(torch.float64).flatten()
    b = r.numel()
    if b == 0:
        return state
    batch_mean, batch_var = float(r.mean()), float(r.var(correction=0))
    new_n = state.n + b
    delta = batch_mean - state.mean
    return RunningStats(
        n=new_n,
        mean=state.mean + delta * (b / new_n),
        m2=state.m2 + batch_var * b + delta**2 * (state.n * b / new_n),
        max=max(state.max, float(r.max())),
        min=min(state.min, float(r.min())),
    )


def running_meanstd(rewards, state: RunningStats):
    """PAR's "Meanstd" baseline: r' = (r − μ_run)/σ_run (σ_run = 0 divides by 1, as the code)."""
    std = state.std
    return (rewards.to(torch.float32) - state.mean) / (std if std > 0 else 1.0)


def running_clip(rewards, state: RunningStats):
    """PAR's "Clip" baseline: r' = clip(r, μ_run − σ_run, μ_run + σ_run)."""
    return rewards.to(torch.float32).clamp(state.mean - state.std, state.mean + state.std)


def running_minmax(rewards, state: RunningStats):
    """PAR's "Minmax" baseline: r' = (r − min_run)/(max_run − min_run).

    Where max_run = min_run the code divides 0 by 0 (NaN); this gives 0 there, which is what
    the runtime makes of a NaN reward anyway."""
    span = state.max - state.min
    r = rewards.to(torch.float32)
    return (r - state.min) / span if span != 0 else torch.zeros_like(r)


_RUNNING = {"meanstd": running_meanstd, "clip": running_clip, "minmax": running_minmax}


def par_running(rewards, state: RunningStats, mode: Literal["meanstd", "clip", "minmax"]):
    """One step of a PAR running-statistics baseline: ``(shaped rewards, new state)``.

    As the code, the statistics are updated with the current batch first, then applied to it:

        Meanstd  r' = (r − μ_run)/σ_run
        Clip     r' = clip(r, μ_run − σ_run, μ_run + σ_run)
        Minmax   r' = (r − min_run)/(max_run − min_run)

    μ_run and σ_run are the mean and population std of every reward seen so far, this batch
    included. The code shares one ``RunningStats`` between the three and updates it once per
    flag that is on, so chaining two of them here means passing the state through both.

    These need state across steps, so they are not stages yet: they become stages when the
    runtime's stage-state contract lands (state saved in checkpoints, per run).

    Example (catalog A §11), first batch r = [2.0, 0.5, −1.0, 4.0] (μ = 1.375, σ = 1.84984):
    Meanstd [0.3379, −0.4730, −1.2839, 1.4190]; Clip [2.0, 0.5, −0.4748, 3.2248]; Minmax
    [0.6, 0.3, 0.0, 1.0].
    """
    new_state = running_stats_update(state, rewards)
    return _RUNNING[mode](rewards, new_state), new_state


# --------------------------------------------------------------------------------------------
# xrpo.novelty_sharpen
# --------------------------------------------------------------------------------------------


class NoveltyParams(StageParams):
    lambda_novelty: float = Field(2.5, ge=0, le=1000, description="λ_novelty, the scale of the novelty bonus "
                                  "(2.5, the paper's reproducibility statement as quoted by its reviews).")
    kappa_clip: float = Field(0.5, ge=0, le=100, description="κ_clip: the bonus is at most κ·A (0.5, as "
                              "quoted from the paper).")
    mean_over: Literal["group", "positive"] = Field(
        "group", description="s̄ averages the mean log-probs of the whole group (the catalog's reading) or "
        "of the responses with A > 0 only (the alternative reading)."
    )


@stage(
    "xrpo.novelty_sharpen",
    kind="advantage",
    inputs={"advantages": "Advantage[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=NoveltyParams,
    needs=("logprobs",),
    paper=XRPO_PAPER,
)
def novelty_sharpen(advantages, groups, *, lambda_novelty, kappa_clip, mean_over):
    """XRPO's novelty sharpening: a bounded bonus for correct responses the policy found unlikely.

        s_i  = (1/|y_i|) Σ_t log π_old(y_{i,t})        (0 for an empty response)
        η_i  = exp(s_i − s̄_g)                           s̄_g: mean of s over i's group g
        A⁺_i = A_i + min( max(λ·(1 − η_i), 0), κ·A_i )   where A_i > 0
        A⁺_i = A_i                                       otherwise

    Reconstructed from the paper's description (confidence L): the paper body and official
    code could not be read; the rule (the paper's Eq. 6) and λ = 2.5, κ = 0.5 come from the
    paper's public reviews. A response more surprising than its group's average (η < 1) gets
    up to κ·A more; a typical one (η ≥ 1) nothing. Only A > 0 ("correct") responses change, so
    the sign of an advantage never flips. s uses the behaviour (rollout) log-probs and carries
    no gradient. Shapes: advantages (B,), groups.mask (B, T) → (B,). A group whose advantages
    are all 0 (all rewards equal) stays 0. XRPO's rollout allocator and in-context seeding are
    separate (they need the sampler and prompt stages).

    Example (catalog B §3.2): GRPO A = [0.866, 0.866, −0.866, −0.866] (rewards [1, 1, 0, 0]),
    mean log-probs s = [−0.2, −0.6, −0.4, −0.3]: s̄ = −0.375, η = [1.191, 0.799, 0.975,
    1.078]; response 2's bonus is min(2.5·0.2015, 0.5·0.866) = 0.433 → A⁺ = [0.866, 1.299,
    −0.866, −0.866].
    """
    index, G = groups.group_index, groups.num_groups
    mask = groups.mask  # (B, T)
    valid = mask > 0
    logp = torch.where(valid, groups.need("logprobs").to(torch.float32), torch.zeros_like(mask))
    lengths = valid.sum(-1).to(torch.float32)  # (B,)
    s = logp.sum(-1) / lengths.clamp(min=1)  # (B,)
    a = advantages.to(torch.float32)
    positive = a > 0
    weight = torch.ones_like(s) if mean_over == "group" else positive.to(s.dtype)
    s_bar = group_sum(s * weight, index, G) / group_sum(weight, index, G).clamp(min=1)  # (G,)
    eta = torch.exp(s - s_bar[index])
    bonus = torch.minimum((lambda_novelty * (1 - eta)).clamp(min=0), kappa_clip * a)
    return torch.where(positive, a + bonus, a)


# --------------------------------------------------------------------------------------------
# aspo.early_call_bonus (Eq. 2) and aspo.early_call_reward (Eq. 1)
# --------------------------------------------------------------------------------------------


class _MarkerParams(StageParams):
    marker: str = Field(min_length=1, description="What starts a tool call in the decoded response: a plain "
                        "substring, or a regular expression with regex = true. Required (the paper's model "
                        "writes Python code for an interpreter; its exact marker is not stated).")
    regex: bool = Field(False, description="Read marker as a regular expression (Python re, first match) "
                        "instead of a plain substring.")

    @model_validator(mode="after")
    def _valid_regex(self):
        if self.regex:
            try:
                re.compile(self.marker)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
            except (RecursionError, OverflowError) as exc:
                raise ValueError(f"regular expression is too complex to compile ({type(exc).__name__})") from None
        return self


def first_marker(texts: list[str], marker: str, regex: bool) -> list[int]:
    """Character offset of the first ``marker`` in each text, −1 where there is none."""
    if regex:
        pattern = re.compile(marker)
        return [m.start() if (m := pattern.search(t)) is not None else -1 for t in texts]
    return [t.find(marker) for t in texts]


def _eligible_positions(correct, groups, marker, regex):
    """(p, L, E): first-call offset and length of each response in characters, and the
    eligible set E (correct, with a tool call)."""
    texts = [str(t) for t in groups.need("response")]
    device = groups.mask.device
    p = torch.tensor(first_marker(texts, marker, regex), dtype=torch.float32, device=device)
    L = torch.tensor([len(t) for t in texts], dtype=torch.float32, device=device)
    E = (correct.to(torch.float32) > 0) & (p >= 0)
    return p.clamp(min=0), L, E


class EarlyCallBonusParams(_MarkerParams):
    delta: float = Field(-2.0, ge=-100, le=100, description="δ: negative, so an earlier-than-average call "
                         "gains (paper §4.5: −2.0 'conservative', −2.5 'aggressive'; its figure legends "
                         "read 1.5 and 2).")
    k: float = Field(0.7, ge=0, le=1, description="k: the bonus is at most k·|A| (paper: 0.7 conservative, "
                     "0.9 aggressive); k < 1 never flips a sign.")


@stage(
    "aspo.early_call_bonus",
    kind="advantage",
    inputs={"advantages": "Advantage[seq]", "correct": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=EarlyCallBonusParams,
    needs=("response",),
    paper=ASPO_PAPER.format(eq="2"),
)
def early_call_bonus(advantages, correct, groups, *, marker, regex, delta, k):
    """ASPO: a clipped advantage bonus for correct responses that call a tool early (paper Eq. 2).

        E     = { i : correct_i > 0 and o_i contains a tool call }        (per group)
        p_i   = position of the first tool call in o_i,  L_i = length of o_i
        b_i   = δ · (p_i − mean_{j∈E} p_j) / mean_{j∈E} L_j
        A'_i  = A_i + clip(b_i, −k·|A_i|, +k·|A_i|)    for i ∈ E;   A'_i = A_i otherwise

    Reconstructed from the paper's description (confidence M: Eq. 2 read in the v1 text; no
    official code exists). It changes the advantage, not the reward: a bonus on the reward
    was unstable under group normalisation (Eq. 1, aspo.early_call_reward). The paper clips to ±k·A_i; for a correct response in a
    group with mixed binary rewards A_i ≥ 0 and the two agree; |A_i| guards the A_i < 0 case
    (non-binary rewards). An all-correct group has A = 0, so it is unchanged.

    Conventions here: the tool call is found by ``marker`` in the decoded response, and p and
    L are counted in **characters** of the decoded text (tokens for the builtin character
    tokenizer); the bonus depends only on their ratio. Exact token positions need the runtime
    to record a tool-call position. Tool execution is not required (the paper does not
    require the code to run). Shapes: advantages (B,), correct (B,) → (B,).

    Example (catalog C §1): R = [1, 1, 1, 0, 1, 0], first calls at [50, 400, none, 120, 900,
    30], lengths [1000, 1200, 800, 600, 1500, 900], GRPO A = [0.6455 ×3, −1.2910, 0.6455,
    −1.2910]: E = {0, 1, 4}, mean p = 450, mean L = 1233.3; δ = −2.0, k = 0.7 give A' =
    [1.0973, 0.7266, 0.6455, −1.2910, 0.1936, −1.2910]; δ = −2.5, k = 0.9 give [1.2264,
    0.7468, 0.6455, −1.2910, 0.0645, −1.2910].
    """
    index, G = groups.group_index, groups.num_groups
    p, L, E = _eligible_positions(correct, groups, marker, regex)
    e = E.to(torch.float32)
    n_e = group_sum(e, index, G).clamp(min=1)  # (G,)
    p_bar = (group_sum(p * e, index, G) / n_e)[index]
    L_bar = (group_sum(L * e, index, G) / n_e)[index]
    b = torch.where(L_bar > 0, delta * (p - p_bar) / L_bar.clamp(min=1e-30), torch.zeros_like(p))
    a = advantages.to(torch.float32)
    cap = k * a.abs()
    return torch.where(E, a + torch.maximum(torch.minimum(b, cap), -cap), a)


class EarlyCallRewardParams(_MarkerParams):
    delta: float = Field(ge=-100, le=100, description="δ (negative rewards early calls). Required: the paper "
                         "gives no value for Eq. 1 (catalog C uses −2 in its example).")
    c: float = Field(gt=0, le=100, description="c: the clip of the standardised position. Required: not "
                     "given in the paper (catalog C uses 1 in its example).")
    std: Literal["sample", "population"] = Field(
        "sample", description="std of the positions over E: sample (N−1; catalog C's example) or population "
        "(N); the paper does not say."
    )


@stage(
    "aspo.early_call_reward",
    kind="reward",
    inputs={"correct": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=EarlyCallRewardParams,
    needs=("response",),
    paper=ASPO_PAPER.format(eq="1") + "; the reward-shaping variant the paper rejects",
)
def early_call_reward(correct, groups, *, marker, regex, delta, c, std):
    """ASPO's rejected baseline (paper Eq. 1): an early-tool-call bonus added to the reward.

        r'_i = δ · clip( (p_i − mean_{j∈E} p_j) / std_{j∈E} p_j, −c, c )    for i ∈ E;  0 otherwise

    E and p as aspo.early_call_bonus (correct responses with a tool call; positions in
    characters of the decoded response). Add it to the correctness,
    ``reward r = correct + aspo.early_call_reward(correct, groups, ...)`` (the paper's
    R_i = 1 + r'_i for i ∈ E), then a normal estimator. The paper shows why it fails: in an
    all-correct group the 1 cancels and about half of the correct responses get a negative
    advantage (training collapsed, its Fig. 5a). Kept as a baseline; reconstructed from the
    paper's description (confidence M); δ and c have no published values and are required. Where E's positions
    are all equal, or E has one member, the standardised position is 0.

    Example (catalog C §1): an all-correct group with first calls at [50, 400, 900, 120],
    δ = −2, c = 1, sample std: r' = [1.6457, −0.1685, −2.0, 1.2828], so R = [2.6457, 0.8315,
    −1.0, 2.2828] and GRPO gives [0.8784, −0.2163, −1.3216, 0.6595].
    """
    index, G = groups.group_index, groups.num_groups
    p, _, E = _eligible_positions(correct, groups, marker, regex)
    e = E.to(torch.float32)
    n_e = group_sum(e, index, G)  # (G,)
    mean = group_sum(p * e, index, G) / n_e.clamp(min=1)
    d = torch.where(E, p - mean[index], torch.zeros_like(p))
    dof = n_e - 1 if std == "sample" else n_e
    sigma = (group_sum(d * d, index, G) / dof.clamp(min=1)).sqrt()[index]  # (B,)
    z = torch.where(sigma > 0, d / sigma.clamp(min=1e-30), torch.zeros_like(d))
    return torch.where(E, delta * z.clamp(-c, c), torch.zeros_like(z))


# --------------------------------------------------------------------------------------------
# r3.entropy_rank_reward (SERR) and r3.length_reward
# --------------------------------------------------------------------------------------------


class EntropyRankParams(StageParams):
    p: float = Field(gt=0, le=1, description="p: the peak entropy averages the top k_i = max(1, ⌊p·L_i⌋) "
                     "token entropies. Required: the paper names p but gives no value (catalog B's example "
                     "uses 0.2).")
    r_max: float = Field(gt=0, le=1000, description="R_max: the reward of the best-ranked response. Required: "
                         "not given in the paper (catalog B's example uses 0.5).")
    eligible: Literal["truncated", "failed"] = Field(
        "truncated", description="Which responses of an all-failed group are ranked: the truncated ones (the "
        "paper's Algorithm 1) or every failed one (its abstract's 'truncated or failed')."
    )
    ties: Literal["index", "average"] = Field(
        "index", description="Equal dominance scores: ranked in batch order (catalog B's reading) or all "
        "given their average rank."
    )


@stage(
    "r3.entropy_rank_reward",
    kind="reward",
    inputs={"correct": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=EntropyRankParams,
    needs=("entropy", "truncated"),
    paper=R3_PAPER + " (SERR, structural-entropy ranking reward)",
)
def entropy_rank_reward(correct, groups, *, p, r_max, eligible, ties):
    """R³'s SERR: rank the truncated responses of an all-failed group by their entropy structure.

        E_peak,i   = mean of the top k_i token entropies,  k_i = max(1, ⌊p·L_i⌋)
        E_global,i = (1/L_i) Σ_t H_{i,t}
        i ≻ j      ⟺  E_peak,i > E_peak,j  and  E_global,i < E_global,j
        S_i        = Σ_{j ≠ i} 1[i ≻ j]                  (over the N ranked responses of the group)
        R_i        = R_max · (1 − rank_i / (N − 1))       rank 0 = highest S

    Reconstructed from the paper's description (confidence M; §3, read from an excerpt, no
    code): a response that explores sharply at a few tokens (high peak entropy) while staying
    confident overall (low mean entropy) ranks higher. Ranked are the responses of groups in
    which every response failed (correct ≤ 0) that were truncated (``eligible`` =
    "truncated") or all of them ("failed"), and that have at least one token. Everything else
    gets 0, and so does a group with a single ranked response (nothing to rank it against).
    H is the behaviour policy's token entropy. Add it to the correctness:
    ``reward r = correct + r3.entropy_rank_reward(correct, groups, p = 0.2, r_max = 0.5)``.
    R³'s replay of past successes into such groups (CCR) and its reflection prompts need
    state across steps and are separate. Shapes: correct (B,), entropy (B, T) → (B,).

    Example (catalog B §3.7, p = 0.2, R_max = 0.5): four truncated failures with E_peak =
    [2.25, 1.15, 0.20, 2.95] and E_global = [0.57, 0.99, 0.12, 1.41]: only 0 ≻ 1, so S =
    [1, 0, 0, 0] and R = [0.5, 0.3333, 0.1667, 0] (ties in batch order). With one replayed
    success (reward 1) in the group, GRPO with the population std and eps 1e-6 gives
    [0.291, −0.194, −0.680, −1.166, 1.748].
    """
    index, G = groups.group_index, groups.num_groups
    mask = groups.mask
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
    valid = mask > 0
    H = torch.where(valid, groups.need("entropy").to(torch.float32), torch.zeros_like(mask))  # (B, T)
    L = valid.sum(-1)  # (B,) long
    k = (p * L.to(torch.float64)).floor().to(torch.long).clamp(min=1)  # (B,)
    top = torch.sort(torch.where(valid, H, torch.full_like(H, -float("inf"))), dim=-1, descending=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).cumsum(-1)  # valid entropies first
    Lf = L.to(torch.float32)
    peak = top.gather(-1, (k - 1).clamp(max=H.shape[-1] - 1)[:, None])[:, 0] / k.to(torch.float32)
    glob = H.sum(-1) / Lf.clamp(min=1)

    c = correct.to(torch.float32)
    _, best = group_min_max(c, index, G)
    all_failed = (best <= 0)[index]
    ranked = all_failed & (L > 0)
    if eligible == "truncated":
        ranked = ranked & groups.need("truncated").to(torch.bool)

    pos, width = group_slots(index, G)
    slot_peak = to_slots(peak, index, pos, G, width)  # (G, n)
    slot_glob = to_slots(glob, index, pos, G, width)
    slot_on = to_slots(ranked.to(torch.float32), index, pos, G, width) > 0
    pair = slot_on[:, :, None] & slot_on[:, None, :]  # (G, n, n): i and j both ranked
    beats = (slot_peak[:, :, None] > slot_peak[:, None, :]) & (slot_glob[:, :, None] < slot_glob[:, None, :])
    S = (beats & pair).sum(-1)  # (G, n); i ≻ i never holds
    above = ((S[:, None, :] > S[:, :, None]) & pair).sum(-1).to(torch.float32)  # ranked j with S_j > S_i
    same = (S[:, None, :] == S[:, :, None]) & pair  # includes i itself
    if ties == "index":
        ahead = torch.arange(width, device=mask.device)
        rank = above + (same & (ahead[None, None, :] < ahead[None, :, None])).sum(-1)
    else:
        rank = above + (same.sum(-1) - 1) / 2
    N = slot_on.sum(-1, keepdim=True).to(torch.float32)  # (G, 1)
    reward = r_max * (1 - rank / (N - 1).clamp(min=1))
    reward = torch.where(slot_on & (N >= 2), reward, torch.zeros_like(reward))  # (G, n)
    return reward[index, pos]


class LengthRewardParams(StageParams):
    max_len: int = Field(32768, ge=1, le=10_000_000, description="L_max, the length at which the bonus reaches "
                         "0 (paper: 32768, the training length limit).")


@stage(
    "r3.length_reward",
    kind="reward",
    inputs={"correct": "Signal[seq]", "groups": "Rollouts"},
    output="Signal[seq]",
    params=LengthRewardParams,
    paper=R3_PAPER + " (length reward of correct answers)",
)
def length_reward(correct, groups, *, max_len):
    """R³'s length reward: shorter correct responses earn more.

        r_len,i = max(0, 1 − |y_i| / L_max)    where correct_i > 0;  0 otherwise

    Reconstructed from the paper's description (confidence M): the reward of a correct
    answer is 1 + r_len. |y_i|
    counts response tokens. Write ``reward r = correct + r3.length_reward(correct, groups)``.
    Shapes: (B,) → (B,). Example (L_max 10): correct [1, 1, 0] with lengths [2, 12, 2] give
    [0.8, 0, 0].
    """
    lengths = groups.mask.sum(-1).to(torch.float32)
    bonus = (1 - lengths / max_len).clamp(min=0)
    return torch.where(correct.to(torch.float32) > 0, bonus, torch.zeros_like(bonus))


__all__ = [
    "RunningStats",
    "fitted_poly",
    "fitted_poly_coefficients",
    "first_marker",
    "group_slots",
    "par_running",
    "running_clip",
    "running_meanstd",
    "running_minmax",
    "running_stats_update",
    "to_slots",
]
