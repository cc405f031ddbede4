"""Stateful advantage shaping (issue 5): MSSR's per-prompt value tracker and VERL's effective-rank bonus.

Both methods keep something across training steps, declared with ``state={...}`` and held in
the stage's :class:`~shapeflow.stdlib.state.StageState`, so checkpoints, ``--resume`` and
``replay --state`` carry it (see ../methods catalog A §3 and §6, and methods/README.md for
the official code's corner cases, which are the defaults here).

    mssr                   MSSR: A = R − V̂(x) from a per-prompt Beta tracker, batch-normalised;
                           the tracker forgets at a rate ρ driven by the KL to the reference
    mssr.token_entropy     the sampled-token entropy proxy H = −p·log p of the behaviour policy
    mssr.entropy_shaping   A' = A + min(α·H, |A|/κ) (Cheng et al.; any advantage, any entropy)
    verl_er                VERL: A' = A + min(ReLU(ψ), |A|/κ), ψ from the effective rank of the
                           last-layer hidden states and its velocity / acceleration, against
                           EMA baselines
    verl_er.effective_rank, verl_er.velocity, verl_er.acceleration
                           the three per-response metrics on their own (signals)

Pure, tested helpers: ``mssr_rho`` (the forgetting-rate mapping), ``effective_rank_of``,
``window_effective_ranks``, ``rank_metrics`` and ``verl_er_psi``.

Shapes: B responses, T padded tokens (``groups.mask`` (B, T)), H hidden units
(``hidden_states`` (B, T, H), zero on padding). A sequence value is (B,), a token value
(B, T), zero on padding.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import to_tokens
from shapeflow.stdlib.registry import StageParams, stage

# --------------------------------------------------------------------------------------------
# MSSR (catalog A §3)
# --------------------------------------------------------------------------------------------

_MSSR_PAPER = (
    "MSSR: Multimodal Stabilized Single-Rollout, arXiv:2512.18215 (Tencent AI Lab / UMD); conventions of the "
    "official code ruiiu/MSSR verl/trainer/core_algos.py MVSRValueTracker, compute_mvsr_advantage, "
    "compute_token_entropy and compute_entropy_advantage_shaping, examples/config_mssr.yaml and 7b_mssr.sh "
    "(catalog A §3)"
)
_CHENG_PAPER = (
    "Cheng et al., Reasoning with Exploration: An Entropy Perspective on Reinforcement Learning for LLMs, "
    "arXiv:2506.14758 (the shaping term); as MSSR's compute_entropy_advantage_shaping, ruiiu/MSSR (catalog A §3)"
)
RHO_MAPPINGS = ("code", "decreasing", "fixed")


def mssr_rho(history: Sequence[float], *, rho_min: float = 0.875, rho_max: float = 0.96, kl_target: float = 0.01,
             window: int = 10, mapping: str = "code") -> float:
    """MSSR's forgetting rate ρ from the recent per-step KL values (the current one last).

        k̄ = mean of the last ``window`` values of ``history``       (none: ρ = (ρ_min + ρ_max)/2)
        code:        k̄ > target:  ρ = ρ_max − min(k̄/target, 1)·(ρ_max − ρ_min)   (= ρ_min)
                     k̄ ≤ target:  ρ = ρ_min + (k̄/target)·(ρ_max − ρ_min)
        decreasing:  ρ = ρ_max − min(k̄/target, 1)·(ρ_max − ρ_min)                 (every k̄)
        fixed:       ρ = (ρ_min + ρ_max)/2
        then clipped to [ρ_min, ρ_max].

    "code" is the official ``MVSRValueTracker._get_adaptive_rho``. It is discontinuous at
    k̄ = target (ρ_max just below, ρ_min just above) and below the target gives a *lower* ρ
    (faster forgetting) for a *lower* KL — the opposite of the code's own comment ("lower KL →
    higher ρ, slower forgetting"). "decreasing" is that comment's reading: continuous, ρ falls
    from ρ_max at k̄ = 0 to ρ_min at k̄ ≥ target. "fixed" is the SPO-era code's use_fixed_rho.

    Example (ρ ∈ [0.875, 0.96], target 0.01): history [0.004, 0.006] → k̄ = 0.005 → code
    0.875 + 0.5·0.085 = 0.9175; decreasing 0.96 − 0.5·0.085 = 0.9175 as well (the two agree at
    half the target); k̄ = 0.002 → code 0.892, decreasing 0.943; k̄ = 0.0101 → both 0.875;
    k̄ = 0.0099 → code 0.95915, decreasing 0.87585.
    """
    if mapping not in RHO_MAPPINGS:
        raise ValueError(f"unknown rho mapping {mapping!r} (one of {', '.join(RHO_MAPPINGS)})")
    middle = (rho_min + rho_max) / 2
    values = list(history)[-window:] if window > 0 else []
    if mapping == "fixed" or not values:
        return float(middle)
    mean_kl = sum(values) / len(values)
    if mapping == "decreasing" or mean_kl > kl_target:
        rho = rho_max - min(mean_kl / kl_target, 1.0) * (rho_max - rho_min)
    else:
        rho = rho_min + (mean_kl / kl_target) * (rho_max - rho_min)
    return float(min(max(rho, rho_min), rho_max))


def _kl_rows(groups, estimator: str, rows: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B,) per-row KL of the behaviour policy to the reference, and which rows have tokens.

    rows = "unmasked": Σ_t over *every* padded position, divided by the valid length (the code:
    ``kl_divergences[i].sum() / response_mask[i].sum()`` on an unmasked ``compute_kl``);
    "masked": over the valid tokens only."""
    from shapeflow.stdlib.losses import kl_estimate

    mask = groups.mask
    logp = groups.need("logprobs").to(torch.float32)
    ref = groups.need("ref_logprobs").to(torch.float32)
    kl = kl_estimate(logp, ref, estimator)  # (B, T), EasyR1 compute_kl casts to float32 as well
    if rows == "masked":
        kl = torch.where(mask > 0, kl, 0.0)
    lengths = mask.sum(-1).to(torch.float64)
    has = lengths > 0
    per_row = (kl.sum(-1).to(torch.float64) / lengths.clamp(min=1)).to(torch.float32)
    return per_row, has


class MssrParams(StageParams):
    rho_min: float = Field(0.875, gt=0, lt=1, description="ρ_min, the fastest forgetting; also sets the prior "
                           "strength N0 = 1/(1 − ρ_min) (= 8). config_mssr.yaml mvsr_rho_min 0.875.")
    rho_max: float = Field(0.96, gt=0, le=1, description="ρ_max, the slowest forgetting (mvsr_rho_max 0.96).")
    kl_target: float = Field(0.01, gt=0, le=1e6, description="The KL that maps to the ends of the ρ range "
                             "(config_mssr.yaml mvsr_target_kl 0.01; the dataclass default is 0.06).")
    kl_window: int = Field(10, ge=1, le=10000, description="How many per-step KL values ρ averages, the current "
                           "one included (hard-coded 10 in the tracker; the config's mvsr_kl_window_size 20 is "
                           "not wired).")
    rho_mapping: Literal["code", "decreasing", "fixed"] = Field(
        "code", description="How the mean KL becomes ρ (see mssr_rho): code: the official, discontinuous "
        "mapping (lower ρ for lower KL below the target); decreasing: continuous, ρ_max at KL 0 falling to "
        "ρ_min at the target, as the code's comment intends; fixed: (ρ_min + ρ_max)/2."
    )
    v_init: float = Field(0.5, ge=0, le=1, description="V̂ of a prompt never seen (mvsr_v_init 0.5): its prior "
                          "is a = v_init·N0, b = (1 − v_init)·N0.")
    eps: float = Field(1e-6, ge=0, le=1, description="The batch variance is clamped at eps before the square "
                       "root (mvsr_eps 1e-6).")
    normalize: bool = Field(True, description="Normalise the advantages over the whole batch (mean 0, "
                            "population variance 1; mvsr_normalize_globally true). A batch of one response is "
                            "never normalised, as the code.")
    estimator: Literal["k3", "k1", "k2", "abs"] = Field(
        "k3", description="The per-token KL estimator of the ρ controller (EasyR1 compute_kl with the "
        "config's kl_penalty): k3 = low_var_kl (the release), k1 = kl, k2 = mse, abs."
    )
    kl_rows: Literal["unmasked", "masked"] = Field(
        "unmasked", description="Each response's KL: unmasked (the code): the estimator summed over every "
        "padded position, then divided by the valid length, so values in the padding count; masked: over "
        "the valid tokens only. The built-in runtime writes 0 log-probs on padding, where both agree; "
        "recorded rollouts may differ."
    )
    outcome_threshold: float = Field(0.5, ge=-1e6, le=1e6, description="The tracker counts a response as a "
                                     "success when its reward is > this (the code binarises at 0.5); the "
                                     "advantage uses the raw reward.")
    init_samples: int = Field(1, ge=0, le=4096, description="n0: responses per prompt of the initialisation "
                              "pass, in which the initial policy answers every prompt of the training set before "
                              "the first step and each prompt starts at its success rate (mvsr_n_init 1); 0 skips "
                              "the pass and every prompt starts at v_init.")

    @model_validator(mode="after")
    def _range(self):
        if self.rho_min > self.rho_max:
            raise ValueError("rho_min must be at most rho_max")
        return self


def mssr_init(rewards, groups, *, rho_min, rho_max, kl_target, kl_window, rho_mapping, v_init, eps, normalize,
              estimator, kl_rows, outcome_threshold, init_samples, state):
    """The initial policy answers every training prompt init_samples times; each prompt's
    tracker starts at its success rate v0 = mean of 1[R > outcome_threshold]: a = N0·v0,
    b = N0·(1 − v0), N0 = 1/(1 − ρ_min) (the official trainer's initialisation, catalog A §3).
    Prompts the pass did not reach start at v_init."""
    alpha: dict[str, float] = state.setdefault("alpha", {})
    beta: dict[str, float] = state.setdefault("beta", {})
    n0 = 1.0 / (1.0 - rho_min)
    wins: dict[str, list[float]] = {}
    for key, success in zip((str(p) for p in groups.prompt_ids), (rewards > outcome_threshold).tolist()):
        wins.setdefault(key, []).append(1.0 if success else 0.0)
    for key, outcomes in wins.items():
        v0 = sum(outcomes) / len(outcomes)
        alpha[key], beta[key] = n0 * v0, n0 * (1.0 - v0)


@stage(
    "mssr",
    kind="advantage",
    inputs={"rewards": "Signal[seq]", "groups": "Rollouts"},
    output="Advantage[seq]",
    params=MssrParams,
    needs=("logprobs", "ref_logprobs"),
    paper=_MSSR_PAPER,
    init=mssr_init,
    init_samples="init_samples",
    state={
        "alpha": "per-prompt a of the Beta(a, b) value tracker, keyed by the prompt id",
        "beta": "per-prompt b of the Beta(a, b) value tracker, keyed by the prompt id",
        "kl_history": "the last kl_window per-step KL values (mean over responses of Σ_t kl / valid length)",
        "rho": "the forgetting rate ρ used by the last update",
    },
)
def mssr(rewards, groups, *, rho_min, rho_max, kl_target, kl_window, rho_mapping, v_init, eps, normalize,
         estimator, kl_rows, outcome_threshold, init_samples, state):
    """MSSR's single-rollout advantage: the reward against a per-prompt Beta value tracker.

        V̂(x) = a(x) / (a(x) + b(x))                       read *before* this batch updates it
        Ã_i  = R_i − V̂(x_i)                                x_i = the prompt of response i
        A_i  = (Ã_i − mean_B Ã) / sqrt(max(Var_B(Ã), eps))  population variance over the whole batch
        then, once per response in batch order:
        o_i = [R_i > 0.5];   a(x_i) ← ρ·a(x_i) + o_i;   b(x_i) ← ρ·b(x_i) + (1 − o_i)

    Before the first step the runtime runs the initialisation pass (``mssr_init``, as the
    official trainer's Algorithm 2): the initial policy answers every training prompt
    init_samples (n0) times and each prompt starts at its success rate, a = N0·v0,
    b = N0·(1 − v0), N0 = 1/(1 − ρ_min). A prompt the pass did not see (init_samples = 0, or
    a prompt outside the training set) starts at a = v_init·N0, b = (1 − v_init)·N0.
    ρ comes from the KL to the reference (``mssr_rho``): this step's KL,
    KL_t = mean_i [ Σ_t k3(log π_old − log π_ref)_{i,t} / |o_i| ], is appended to the history
    first, then ρ = f(mean of the last 10). Meant for one rollout per prompt (rollout n = 1,
    as MSSR trains); it works with any n: each response is one tracker update.

    Corner cases of the official code, reproduced: the tracker's values come back as float32;
    the variance is the population variance clamped at eps; a batch of one response is not
    normalised; the KL row is summed over *all* positions (padding included) and divided by
    the valid length (``kl_rows`` = "masked" for the clean reading); a prompt twice in a batch
    reads the same V̂ and is updated twice; rewards are binarised at 0.5 for the tracker only
    (Ã uses the raw reward). The ρ mapping is the code's discontinuous one (``rho_mapping``).
    Here, not in the code: a response without tokens is left out of the KL mean (the code
    divides by zero), and a non-finite KL is not added to the history (the code would carry a
    NaN into ρ and every tracked value).

    A tracker can also be seeded by loading a state (``replay --state`` / a checkpoint; a
    resumed run keeps its tracker and does not run the pass again). The optional per-prompt
    ρ = 2^(−D/D_half) (off in the release) is not implemented.

    The tracker (``alpha``, ``beta``, keyed by the prompt id as a string), the KL history and ρ
    are the stage's state: saved in checkpoints, restored on --resume, logged as
    ``state/<binding>/alpha/mean`` etc. Add the entropy shaping with ``mssr.entropy_shaping``.

    Shapes: rewards (B,) → (B,). Example (catalog A §3): four prompts, one rollout each, the
    tracker at V̂ = [1, 0, 1, 0] (a, b = [8, 0], [0, 8], [8, 0], [0, 8]), KL history [0.004]
    and this step's KL 0.006 → ρ = 0.9175; rewards [1, 1, 0, 0] → Ã = [0, 1, −1, 0] →
    A = [0, 1.4142, −1.4142, 0]; the tracker moves to V̂ = [1.0, 0.1199, 0.8801, 0.0]
    (prompt 1: a = 1, b = 0.9175·8 = 7.34).
    """
    r = rewards.to(torch.float32)
    size = r.numel()
    alpha: dict[str, float] = state.setdefault("alpha", {})
    beta: dict[str, float] = state.setdefault("beta", {})
    history: list[float] = state.setdefault("kl_history", [])
    n0 = 1.0 / (1.0 - rho_min)
    a0, b0 = v_init * n0, (1.0 - v_init) * n0
    keys = [str(p) for p in groups.prompt_ids]
    if len(keys) != size:
        raise ValueError(f"mssr: {size} rewards for {len(keys)} prompt ids")
    # read before the update (a prompt twice in the batch reads one value); float32 as the code
    fallback = a0 / (a0 + b0)
    values = [alpha[k] / (alpha[k] + beta[k]) if k in alpha else fallback for k in keys]
    v = torch.tensor(values, dtype=torch.float32, device=r.device)
    raw = r - v
    if normalize and size > 1:
        var, mean = torch.var_mean(raw, correction=0)
        adv = (raw - mean) * torch.rsqrt(var.clamp(min=eps))
    else:
        adv = raw
    if size == 0:
        return adv
    # this step's KL enters the history before ρ is computed
    per_row, has = _kl_rows(groups, estimator, kl_rows)
    if bool(has.any()):
        current = float(per_row[has].mean())
        if math.isfinite(current):
            history.append(current)
            del history[:-kl_window]
    rho = mssr_rho(history, rho_min=rho_min, rho_max=rho_max, kl_target=kl_target, window=kl_window,
                   mapping=rho_mapping)
    state["rho"] = rho
    for key, success in zip(keys, (r > outcome_threshold).tolist()):
        o = 1.0 if success else 0.0
        a, b = (alpha[key], beta[key]) if key in alpha else (a0, b0)
        alpha[key] = rho * a + o
        beta[key] = rho * b + (1.0 - o)
    return adv


@stage(
    "mssr.token_entropy",
    kind="signal",
    inputs={"groups": "Rollouts"},
    output="Signal[tok]",
    needs=("logprobs",),
    paper=_MSSR_PAPER,
)
def token_entropy(groups):
    """MSSR's per-token "entropy": the sampled token's term −p·log p of the behaviour policy.

        H_{i,t} = −p_{i,t} · log p_{i,t},    p_{i,t} = π_old(y_{i,t} | ·) = exp(logprobs)

    A proxy that needs only the sampled token's log-prob (the official
    ``compute_token_entropy``), not the entropy over the vocabulary; it is largest (1/e ≈
    0.368) at p = 1/e and 0 for p → 0 and p = 1. The full-vocabulary entropy is
    ``signals.entropy(groups)``; either can feed ``mssr.entropy_shaping``.

    Shapes: (B, T), zero on padding. Example: p = [0.3, 0.8, 0.6] → [0.3612, 0.1785, 0.3065].
    """
    mask = groups.mask
    logp = torch.where(mask > 0, groups.need("logprobs").to(torch.float32), 0.0)
    return torch.where(mask > 0, -torch.exp(logp) * logp, 0.0)


class EntropyShapingParams(StageParams):
    alpha: float = Field(0.4, ge=0, le=100, description="α, the weight of the entropy term (entropy_alpha 0.4).")
    kappa: float = Field(2.0, gt=0, le=1e6, description="κ: the term is at most |A|/κ (entropy_kappa 2.0), so "
                         "with κ > 1 it never flips an advantage's sign.")


@stage(
    "mssr.entropy_shaping",
    kind="advantage",
    inputs={"advantages": "Advantage[*]", "groups": "Rollouts", "entropy": "Signal[tok]"},
    output="Advantage[tok]",
    params=EntropyShapingParams,
    paper=_CHENG_PAPER,
)
def entropy_shaping(advantages, groups, entropy, *, alpha, kappa):
    """Entropy-based advantage shaping: a bounded, non-negative bonus on every token.

        ψ_{i,t}  = min(α · H_{i,t}, |A_{i,t}| / κ)          (H detached: a value, no gradient)
        A'_{i,t} = A_{i,t} + ψ_{i,t}

    ψ ≥ 0 always: it raises positive advantages and shrinks negative ones toward 0 (never past
    it when κ > 1) — MSSR's "regularise advantage magnitudes". The entropy is an input, so the
    source is the spec's choice (``entropy_source`` in catalog A): ``mssr.token_entropy(groups)``
    (the sampled-token proxy −p·log p, MSSR's code and default) or ``signals.entropy(groups)``
    (the full-vocabulary entropy of Cheng et al.'s formula). Any advantage can be shaped:
    ``mssr(r, groups) |> mssr.entropy_shaping(groups, mssr.token_entropy(groups))`` is MSSR,
    ``grpo(r, groups) |> mssr.entropy_shaping(groups, signals.entropy(groups))`` GRPO with
    Cheng et al.'s term. A sequence advantage is broadcast to the tokens first, as the code does.

    Shapes: advantages (B,) or (B, T), entropy (B, T) → (B, T), zero on padding. Example
    (catalog A §3, α = 0.4, κ = 2): A = 1.4142 with p = [0.3, 0.8, 0.6] → ψ = [0.1445, 0.0714,
    0.1226] → [1.5587, 1.4856, 1.5368]; A = −1.4142 with p = [0.7, 0.95, 0.2] → ψ = [0.0999,
    0.0195, 0.1288] → [−1.3143, −1.3947, −1.2855]; A = 0 stays 0.
    """
    mask = groups.mask
    a = to_tokens(advantages.to(torch.float32), mask)
    h = to_tokens(entropy.detach().to(torch.float32), mask)
    psi = torch.minimum(alpha * h, a.abs() / kappa)
    return torch.where(mask > 0, a + psi, 0.0)


# --------------------------------------------------------------------------------------------
# VERL: effective-rank metrics (catalog A §6)
# --------------------------------------------------------------------------------------------

_VERL_PAPER = (
    "VERL: Velocity-Exploiting Rank-Learning, arXiv:2509.23808 (Tsinghua SIGS / UCLA); conventions of the "
    "official code hf618/VERL verl/trainer/metrics_utils.py (compute_single_effective_rank, "
    "calculate_diffs_for_single_sample_optimized), metrics_calculator.py, reward_manager_versions.py "
    "(RewardManager) and ppo/ray_trainer.py (compute_advantage), train.sh (catalog A §6)"
)
_ER_EPS = 1e-8
_GRAM_ELEMENTS = 1 << 25  # rows per eigensolver call are chunked to keep b·N² below this


def effective_rank_of(eigenvalues: "torch.Tensor", keep: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Effective rank from the eigenvalues of centred Gram matrices, batched over the leading dims.

        σ_k = √max(λ_k, 0),  p_k = σ_k / (Σ σ + 1e-8),  ER = exp(−Σ_k p_k · log(p_k + 1e-8))

    (the official ``batched_effective_rank`` / ``compute_single_effective_rank``: σ are the
    singular values of the centred token matrix). ``keep`` (same shape, bool) drops eigenvalues,
    as the official code keeps only the top min(tokens, hidden) ones. A zero eigenvalue
    contributes nothing, so padded Gram matrices (zero rows) give the same value."""
    s = torch.sqrt(torch.relu(eigenvalues))
    if keep is not None:
        s = torch.where(keep, s, 0.0)
    p = s / (s.sum(-1, keepdim=True) + _ER_EPS)
    return torch.exp(-(p * torch.log(p + _ER_EPS)).sum(-1))


def _eigvalsh(g: "torch.Tensor") -> "torch.Tensor":
    try:
        return torch.linalg.eigvalsh(g)
    except RuntimeError:  # no convergence in float32 (a degenerate matrix): solve in float64
        return torch.linalg.eigvalsh(g.to(torch.float64)).to(g.dtype)


def _centred_ranks(x: "torch.Tensor", valid: "torch.Tensor") -> "torch.Tensor":
    """(b,) effective rank of each row's valid tokens of ``x`` (b, n, H), float32, through the
    eigenvalues of the centred Gram matrix: X_c X_cᵀ (n × n) when n ≤ H, else X_cᵀ X_c (H × H)
    — the same non-zero eigenvalues. Padding rows are zero after centring; the top
    min(count, H) eigenvalues are kept (as the code). Rows with fewer than 2 tokens get 0."""
    b, n, hdim = x.shape
    count = valid.sum(1)
    if b == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    side = min(n, hdim)
    # rows per chunk: bounded by the Gram matrices (b·side²) and the float32 copies (b·n·H)
    step = max(1, _GRAM_ELEMENTS // max(side * side, n * hdim, 1))
    out = []
    for lo in range(0, b, step):
        ok = valid[lo:lo + step, :, None]
        chunk = torch.where(ok, x[lo:lo + step].to(torch.float32), 0.0)
        mean = chunk.sum(1, keepdim=True) / count[lo:lo + step].clamp(min=1)[:, None, None].to(torch.float32)
        xc = torch.where(ok, chunk - mean, 0.0)
        gram = xc @ xc.transpose(1, 2) if n <= hdim else xc.transpose(1, 2) @ xc
        eig = _eigvalsh(gram)  # ascending
        k = torch.clamp(count[lo:lo + step], max=hdim)
        keep = torch.arange(side, device=x.device)[None, :] >= (side - k)[:, None]
        out.append(effective_rank_of(eig, keep))
    er = torch.cat(out)
    return torch.where(count >= 2, er, 0.0)


def _compact(hidden: "torch.Tensor", mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Each row's valid tokens moved to the front (in order): (B, T, H), their validity and count."""
    valid = mask > 0
    count = valid.sum(1)
    if bool((valid == (torch.arange(valid.shape[1], device=valid.device)[None, :] < count[:, None])).all()):
        return hidden, valid, count  # already a prefix (every built-in rollout)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    moved = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    return moved, torch.arange(valid.shape[1], device=valid.device)[None, :] < count[:, None], count


def response_effective_rank(hidden: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """(B,) float32 effective rank of all valid tokens of each response (the official full ER;
    rows with fewer than 2 tokens get 0)."""
    x, valid, _ = _compact(hidden, mask)
    return _centred_ranks(x, valid)


def window_effective_ranks(hidden: "torch.Tensor", mask: "torch.Tensor", *, stride: int,
                           max_tokens: int = 512) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B, J) effective ranks of each response's growing prefixes, and which exist.

    As the official ``calculate_diffs_for_single_sample_optimized``: a response longer than
    ``max_tokens`` keeps its last ``max_tokens`` tokens; with m tokens left, window j covers the
    tokens 0..t_j (t_j = (j + 1)·stride, the prefix *including* token t_j) for every t_j < m;
    a response with m < 2·stride has no windows. Windows of the same j have the same size for
    every response, so each j is one batched eigensolver call over the responses that reach it.
    """
    x, valid, count = _compact(hidden, mask)
    bsz, tlen, _ = x.shape
    m = torch.clamp(count, max=max_tokens)
    width = min(tlen, max_tokens)
    if bsz and tlen > width:  # the last m tokens of each row, left-aligned
        start = count - m
        pos = (start[:, None] + torch.arange(width, device=x.device)[None, :]).clamp(max=tlen - 1)
        x = x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
    else:
        x = x[:, :width]
    ts = list(range(stride, width, stride))
    ers = torch.zeros(bsz, len(ts), dtype=torch.float32, device=x.device)
    exists = torch.zeros(bsz, len(ts), dtype=torch.bool, device=x.device)
    for j, t in enumerate(ts):
        active = (m > t) & (m >= 2 * stride)
        if not bool(active.any()):
            break
        rows = active.nonzero().squeeze(-1)
        window = x[rows, : t + 1]
        ers[rows, j] = _centred_ranks(window, torch.ones(window.shape[:2], dtype=torch.bool, device=x.device))
        exists[rows, j] = True
    return ers, exists


def rank_dynamics(ers: "torch.Tensor", exists: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B,) ERV and ERA from the window ranks (B, J):

        v_j = ER_j − (1/j)·Σ_{l<j} ER_l   (j ≥ 1),   ERV = mean_j v_j       (0 with < 2 windows)
        a_j = v_j − v_{j−1}               (j ≥ 2),   ERA = mean_j a_j       (0 with < 3 windows)

    in float64 (the code accumulates Python floats), returned as float32."""
    bsz, jn = ers.shape
    if jn < 2:
        zero = ers.new_zeros(bsz)
        return zero, zero
    e = torch.where(exists, ers.to(torch.float64), 0.0)
    j = torch.arange(jn, device=ers.device, dtype=torch.float64)
    prev_mean = torch.cumsum(e, 1)[:, :-1] / j[1:]  # (B, J−1): mean of ER_0..ER_{j−1}
    v = e[:, 1:] - prev_mean
    v_ok = exists[:, 1:]
    a = v[:, 1:] - v[:, :-1]
    a_ok = exists[:, 2:]
    nv, na = v_ok.sum(1), a_ok.sum(1)
    erv = torch.where(v_ok, v, 0.0).sum(1) / nv.clamp(min=1)
    era = torch.where(a_ok, a, 0.0).sum(1) / na.clamp(min=1)
    return erv.to(torch.float32), era.to(torch.float32)


def rank_metrics(hidden: "torch.Tensor", mask: "torch.Tensor", *, stride: int, max_tokens: int = 512,
                 er_precision: str = "bfloat16") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(ER, ERV, ERA) per response, each (B,), from the last-layer hidden states (B, T, H).

    ER over all valid tokens (rounded through bfloat16 with ``er_precision`` = "bfloat16", as
    the official calculator stores it; then returned in that dtype), ERV and ERA from the
    windows (``window_effective_ranks``, ``rank_dynamics``), float32. Gram route in float32."""
    with torch.no_grad():
        h = hidden.detach()
        er = response_effective_rank(h, mask)
        if er_precision == "bfloat16":
            er = er.to(torch.bfloat16)
        ers, exists = window_effective_ranks(h, mask, stride=stride, max_tokens=max_tokens)
        erv, era = rank_dynamics(ers, exists)
    return er, erv, era


# --------------------------------------------------------------------------------------------
# VERL: the auxiliary signal ψ and the advantage bonus
# --------------------------------------------------------------------------------------------

INDICATORS = ("era", "erv", "er")  # the release's indicator_names order: ER diff 2, ER diff, ER


def _deviation(x: "torch.Tensor", mid: float) -> "torch.Tensor":
    """clip((x − mid)/(|mid| + 1e-8), −5, 5) in x's dtype (bfloat16 for the stored ER, as the code)."""
    return torch.clamp((x - mid) / (abs(mid) + 1e-8), -5.0, 5.0)


def verl_er_psi(era: Any, erv: Any, er: Any, mids: dict[str, float], *, gain: float = 2.0, lam: float = 1.0,
                w_explore: Sequence[float] = (0.0, 0.0, 1.0), w_exploit: Sequence[float] = (0.0, 1.0, 0.0),
                hypothesis: str = "plan_b") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ψ, d) per response: VERL's auxiliary signal and its explore weight.

        δ_k = clip((m_k − mid_k)/(|mid_k| + 1e-8), −5, 5)       k ∈ (ERA, ERV, ER)
        d   = sigmoid(g · δ_ERA)                              (hypothesis plan_b, the release's default)
        w   = d · w_explore + (1 − d) · w_exploit             (w_explore [0, 0, 1], w_exploit [0, 1, 0])
        ψ   = λ · Σ_k w_k · tanh(δ_k)

    so ERA decides between rewarding a high ER (explore) and a high ERV (exploit).
    hypothesis fix_two: d = 0.5; fix_one: w = w_explore + w_exploit. ``er`` may be bfloat16 (the
    stored ER): its δ and tanh are then computed in bfloat16, as the code's tensor arithmetic
    does. Inputs are numbers or (B,) tensors; mids maps "era", "erv", "er" to the baselines.

    Example (catalog A §6; mids ERA 0.05, ERV 0.10, ER 4.0; g = 2, λ = 1): response A with ERA
    −0.0360, ERV 0.3752, ER 2.7204 → d = 0.0311, ψ = 0.9514; response B with 0.0196, 1.4119,
    5.0518 → d = 0.2285, ψ = 0.8302 (ER in float32; through bfloat16 ER 5.0518 is stored as
    5.0625 and ψ = 0.8308).
    """
    def tensor(x):
        return x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float32)

    era, erv, er = tensor(era), tensor(erv), tensor(er)
    devs = [_deviation(x, float(mids[k])) for x, k in zip((era, erv, er), INDICATORS)]
    we = torch.tensor(list(w_explore), dtype=torch.float32, device=era.device)
    wx = torch.tensor(list(w_exploit), dtype=torch.float32, device=era.device)
    if hypothesis == "plan_b":
        d = torch.sigmoid(gain * devs[0].to(torch.float32))
    elif hypothesis == "fix_two":
        d = torch.full_like(devs[0], 0.5, dtype=torch.float32)
    elif hypothesis == "fix_one":
        d = torch.zeros_like(devs[0], dtype=torch.float32)
    else:
        raise ValueError(f"unknown hypothesis {hypothesis!r} (plan_b, fix_two, fix_one)")
    psi = torch.zeros_like(d)
    for k, dev in enumerate(devs):
        w = we[k] + wx[k] if hypothesis == "fix_one" else d * we[k] + (1.0 - d) * wx[k]
        psi = psi + torch.tanh(dev).to(torch.float32) * w
    return lam * psi, d


def _last_token(mask: "torch.Tensor") -> "torch.Tensor":
    """(B, T) bool: each row's last valid token."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).amax(-1).long() - 1  # −1 for an empty row
    return torch.arange(mask.shape[-1], device=mask.device)[None, :] == last[:, None]


class _RankWindowParams(StageParams):
    stride: int = Field(40, ge=1, le=100000, description="s, the window stride in tokens (train.sh diff_stride "
                        "40): windows end at tokens s, 2s, 3s, ...; a response needs 2s tokens for ERV.")
    max_tokens: int = Field(512, ge=2, le=1000000, description="Only the last max_tokens tokens of a response "
                            "enter the windows (the calculator's max_seq_len 512); the response ER uses all.")


class _ErPrecisionParams(StageParams):
    er_precision: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="bfloat16: the response ER is stored in bfloat16, and its deviation from the "
        "baseline computed in bfloat16, as the official calculator and reward manager do; float32: kept in "
        "float32 (the clean reading)."
    )


class VerlErParams(_ErPrecisionParams, _RankWindowParams):
    ema_alpha: float = Field(0.3, gt=0, le=1, description="α of the EMA baselines, mid ← (1 − α)·mid + α·(batch "
                             "mean) (train.sh reward_ema_alpha 0.3; the yaml default 0.7).")
    gain: float = Field(2.0, ge=0, le=1000, description="g, the ERA meta-controller's gain, d = sigmoid(g·δ_ERA) "
                        "(train.sh modulation_gain 2.0; the RewardManager default 1.5).")
    lam: float = Field(1.0, ge=0, le=1000, description="λ, the scale of ψ (aux_reward_global_weight 1.0 with "
                       "aux_fix = true; the performance-scaled λ of aux_fix = false is not implemented).")
    kappa: float = Field(2.0, gt=0, le=1e6, description="κ: the bonus is at most |A|/κ (adv_shaping_kappa 2.0).")
    w_explore: list[float] = Field([0.0, 0.0, 1.0], min_length=3, max_length=3, description="The weights of "
                                   "(ERA, ERV, ER) when exploring, d = 1 (reward_weights [0, 0, 1]).")
    w_exploit: list[float] = Field([0.0, 1.0, 0.0], min_length=3, max_length=3, description="The weights of "
                                   "(ERA, ERV, ER) when exploiting, d = 0 (reward_weights_exploit [0, 1, 0]).")
    hypothesis: Literal["plan_b", "fix_two", "fix_one"] = Field(
        "plan_b", description="How the weights are mixed (the RewardManager's hypothesis_type): plan_b: "
        "d = sigmoid(g·δ_ERA) (its default; the catalog's meta-controller); fix_two: d = 0.5; fix_one: "
        "w_explore + w_exploit. (train_grpo_math_tune_ray.sh passes 'PlanA', which matches no branch.)"
    )
    bonus_placement: Literal["last_token", "all_tokens"] = Field(
        "last_token", description="last_token (the code): ψ goes into the reward tensor at the last response "
        "token, so only that token's advantage changes; all_tokens (the paper's 'shape the advantage'): every "
        "token gets the bonus, each clipped by its own |A|/κ."
    )
    gate: Literal["release", "intended"] = Field(
        "release", description="release (the default, the official code as shipped): train.sh sets "
        "add_reward = False, add_adv = True, and the reward manager computes ψ only when add_reward is true, "
        "so ψ ≡ 0 and the advantage is unchanged (plain GRPO); the metrics are still computed and logged. "
        "intended: ψ computed and used in the advantage only, the evidently intended configuration (a spec "
        "that trains VERL sets this)."
    )
    baseline: Literal["lagged", "previous"] = Field(
        "lagged", description="lagged (the code): the EMA is updated at the end of a step with the previous "
        "step's batch means, so the baseline used at step t holds steps ≤ t − 2 (0 at the first shaped step, "
        "where every δ saturates at ±5); previous: updated before ψ with the previous step's means (steps "
        "≤ t − 1). Both: no shaping at the first step."
    )

    @model_validator(mode="after")
    def _finite_weights(self):
        if not all(math.isfinite(w) for w in self.w_explore + self.w_exploit):
            raise ValueError("w_explore and w_exploit must be finite")
        return self


@stage(
    "verl_er",
    kind="advantage",
    inputs={"advantages": "Advantage[*]", "groups": "Rollouts"},
    output="Advantage[tok]",
    params=VerlErParams,
    needs=("hidden_states",),
    paper=_VERL_PAPER,
    state={
        "mid_era": "EMA baseline of the batch-mean ERA (0 at the start)",
        "mid_erv": "EMA baseline of the batch-mean ERV (0 at the start)",
        "mid_er": "EMA baseline of the batch-mean effective rank (0 at the start)",
        "last_era": "the last training batch's mean ERA (none before the first step)",
        "last_erv": "the last training batch's mean ERV (none before the first step)",
        "last_er": "the last training batch's mean effective rank (none before the first step)",
        "psi": "the mean of ψ over the last batch (0 where no bonus was computed)",
    },
)
def verl_er(advantages, groups, *, stride, max_tokens, er_precision, ema_alpha, gain, lam, kappa, w_explore,
            w_exploit, hypothesis, bonus_placement, gate, baseline, state):
    """VERL: a bounded bonus from the effective rank of the hidden states, added to an advantage.

        metrics per response (``verl_er.effective_rank`` / ``.velocity`` / ``.acceleration``):
            ER  = exp(entropy of the normalised singular values of the centred token matrix)
            ERV = mean_j [ER_j − mean_{l<j} ER_l],  ERA = mean_j [v_j − v_{j−1}]   (prefix windows)
        δ_k = clip((m_k − mid_k)/(|mid_k| + 1e-8), −5, 5)               k ∈ (ERA, ERV, ER)
        d   = sigmoid(g·δ_ERA);   w = d·w_explore + (1 − d)·w_exploit
        ψ   = λ · Σ_k w_k · tanh(δ_k)                                   (``verl_er_psi``)
        A'_{i,t} = A_{i,t} + min(ReLU(ψ_i), |A_{i,t}|/κ)    at the last token (bonus_placement)
        mid_k ← (1 − α)·mid_k + α·mean_batch(m_k)           EMA, from 0, no bias correction

    The baselines and the last batch's means are the stage's state. As the code: no shaping at
    the first step (no previous metrics); the EMA is updated after ψ with the *previous* step's
    batch means, so the baseline at step t holds steps ≤ t − 2 and the first shaped step
    compares against 0 (every δ saturates at ±5; ``baseline`` = "previous" removes the lag);
    the batch means count a response without windows as 0 (read from the calculator, which fills
    such responses with 0; how the release's logger averages is assumed); the response ER is
    stored in bfloat16 (``er_precision``); ψ lands on the last response token only
    (``bonus_placement``). Also the code's: ERV and ERA keep the near-zero eigenvalue of the
    centring among the top min(tokens, H), whose float32 noise moves them (and ER, with fewer
    tokens than hidden units) by ~1e-3; compare them loosely.

    Default = the official code as shipped (``gate`` = "release"): its train.sh sets
    add_reward = False and add_adv = True, and ψ is computed only when add_reward is true, so
    ψ ≡ 0 and A' = A — plain GRPO (methods/README: the code's behaviour is the default, the
    fix an option). ``gate`` = "intended" computes ψ and uses it in the advantage only, the
    evidently intended configuration; specs/verl_er.shape sets it. Also not reproduced: the
    release adds ψ into a bfloat16 reward tensor (the bonus it uses is rounded there, relative
    to the reward), and its ERV/ERA come from an incremental float32 Gram matrix — both move the
    values at the 1e-3 level; the performance-scaled λ (aux_fix = false) is not implemented.

    The metrics come from the last-layer hidden states (need ``hidden_states``, (B, T, H), zero
    on padding), by the eigenvalues of centred Gram matrices in float32, batched over responses
    (one eigensolver call per window size). Shapes: advantages (B,) or (B, T) → (B, T), zero on
    padding.

    Example (catalog A §6, gate "intended", er_precision "float32", mids ERA 0.05, ERV 0.10,
    ER 4.0, g = 2, κ = 2, λ = 1): response A (ERA −0.0360, ERV 0.3752, ER 2.7204) has
    ψ = 0.9514: GRPO A = +0.8660 gets min(0.9514, 0.4330) → A' = +1.2990 on its last token;
    response B (0.0196, 1.4119, 5.0518) has ψ = 0.8302 (0.8308 with the ER in bfloat16):
    A = −0.8660 → A' = −0.4330.
    """
    mask = groups.mask
    a = to_tokens(advantages.to(torch.float32), mask)
    size = mask.shape[0]
    if size == 0:
        return a
    er, erv, era = rank_metrics(groups.need("hidden_states"), mask, stride=stride, max_tokens=max_tokens,
                                er_precision=er_precision)
    means = {"era": float(era.mean()), "erv": float(erv.mean()), "er": float(er.float().mean())}
    previous = None if state.get("last_er") is None else {k: float(state[f"last_{k}"]) for k in INDICATORS}
    mids = {k: float(state.setdefault(f"mid_{k}", 0.0)) for k in INDICATORS}

    def ema(source: dict[str, float]) -> None:
        for k in INDICATORS:
            state[f"mid_{k}"] = (1.0 - ema_alpha) * mids[k] + ema_alpha * source[k]

    out = a
    state["psi"] = 0.0
    if gate == "intended" and previous is not None:
        if baseline == "previous":
            ema(previous)
            mids = {k: float(state[f"mid_{k}"]) for k in INDICATORS}
        psi, _ = verl_er_psi(era, erv, er, mids, gain=gain, lam=lam, w_explore=w_explore, w_exploit=w_exploit,
                             hypothesis=hypothesis)
        psi = psi.to(a.device)
        state["psi"] = float(psi.mean())
        bonus = torch.minimum(torch.relu(psi)[:, None].expand_as(a), a.abs() / kappa)
        where = mask > 0 if bonus_placement == "all_tokens" else _last_token(mask) & (mask > 0)
        out = torch.where(where, a + bonus, a)
        if baseline == "lagged":
            ema(previous)
    for k in INDICATORS:
        state[f"last_{k}"] = means[k]
    return out


@stage(
    "verl_er.effective_rank",
    kind="signal",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=_ErPrecisionParams,
    needs=("hidden_states",),
    paper=_VERL_PAPER,
)
def effective_rank(groups, *, er_precision):
    """Effective rank of each response's last-layer hidden states.

        X = the response's valid tokens (|o| × H),  X_c = X − mean_rows(X)
        σ = singular values of X_c (√ of the eigenvalues of the centred Gram matrix, top min(|o|, H))
        p_k = σ_k/(Σσ + 1e-8),   ER = exp(−Σ p_k log(p_k + 1e-8))

    Between 1 and min(|o|, H): how many directions the response's states spread over. A
    response with fewer than 2 tokens gets 0 (as the code). Float32 Gram route; rounded through
    bfloat16 by default, as the official calculator stores it (``er_precision``). Example: the
    4 tokens [1, 0], [−1, 0], [0, 1], [0, −1] → σ = [√2, √2] → ER = 2.0.
    """
    er = response_effective_rank(groups.need("hidden_states").detach(), groups.mask)
    return er.to(torch.bfloat16).to(torch.float32) if er_precision == "bfloat16" else er


@stage(
    "verl_er.velocity",
    kind="signal",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=_RankWindowParams,
    needs=("hidden_states",),
    paper=_VERL_PAPER,
)
def velocity(groups, *, stride, max_tokens):
    """ERV: how fast the effective rank of a response's growing prefixes rises.

        ER_j = ER of tokens 0..t_j,  t_j = (j + 1)·s < m   (the last max_tokens tokens; m ≥ 2s)
        v_j  = ER_j − (1/j)·Σ_{l<j} ER_l   (j ≥ 1),    ERV = mean_j v_j   (0 with < 2 windows)

    Example: window ranks [2.0, 2.5, 2.6] → v = [0.5, 0.35] → ERV = 0.425.
    """
    ers, exists = window_effective_ranks(groups.need("hidden_states").detach(), groups.mask, stride=stride,
                                         max_tokens=max_tokens)
    return rank_dynamics(ers, exists)[0]


@stage(
    "verl_er.acceleration",
    kind="signal",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=_RankWindowParams,
    needs=("hidden_states",),
    paper=_VERL_PAPER,
)
def acceleration(groups, *, stride, max_tokens):
    """ERA: the change of the rank velocity along a response (windows as ``verl_er.velocity``).

        a_j = v_j − v_{j−1}   (j ≥ 2),    ERA = mean_j a_j   (0 with fewer than 3 windows)

    Example: window ranks [2.0, 2.5, 2.6] → v = [0.5, 0.35] → ERA = −0.15.
    """
    ers, exists = window_effective_ranks(groups.need("hidden_states").detach(), groups.mask, stride=stride,
                                         max_tokens=max_tokens)
    return rank_dynamics(ers, exists)[1]
