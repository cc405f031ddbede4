"""PPO with a learned value model: the critic stages, GAE and the clipped value loss (catalog B10).

A critic is a model stage: ``models.value_head(policy)`` puts a linear value head on the
policy's own last hidden state (one forward serves both; the head trains with the policy's
optimizer), ``models.critic(path)`` loads a model of its own with a value head (verl's
separate critic). Either supplies two needs: ``values`` (V_old(s_t), from the behaviour pass,
no gradient) and ``current_values`` (under the current weights, with gradient, update phase).
V(s_t) is the value of the state in which response token t is chosen, read at the same
position as the logits that score token t.

    model     critic = models.value_head(policy)
    advantage adv    = gae(r, groups, gamma = 1.0, lam = 0.95)
    signal    ret    = gae_returns(r, groups, gamma = 1.0, lam = 0.95)
    objective loss   = losses.ppo_clip(adv, groups) + losses.value(ret, groups, clip = 0.5)
"""

from __future__ import annotations

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.functional import aggregate, masked_whiten, place_at_last_token
from shapeflow.stdlib.losses import AggregationParams
from shapeflow.stdlib.registry import StageParams, stage

_GAE_PAPER = ("Schulman et al., High-Dimensional Continuous Control Using Generalized Advantage Estimation, "
              "arXiv:1506.02438; as verl compute_gae_advantage_return and the PPO critic (catalog B10)")


# --------------------------------------------------------------------------------------------
# the critic: a value head on the policy, or a model of its own
# --------------------------------------------------------------------------------------------


class ValueHeadParams(StageParams):
    lr: float | None = Field(None, gt=0, le=1, description="The head's learning rate; none: train.lr.")
    seed: int = Field(0, ge=0, description="Seed of the head's initialisation (normal, std = the model "
                      "config's initializer_range, zero bias, as a transformers token-classification head).")


@stage("models.value_head", kind="model", inputs={"policy": "Model"}, output="Model", params=ValueHeadParams,
       phase="setup", provides=("values", "current_values"), paper=_GAE_PAPER)
def value_head(policy, *, lr, seed):
    """A critic that shares the policy's trunk: V(s_t) = w·h_t + b on its last hidden state.

    One forward of the policy gives the log-probs and the values, so a value head costs one
    (hidden × 1) matrix product per token; the value loss's gradient flows into the shared
    trunk (TRL's PPO with a shared value head, not verl's separate critic). The head is saved
    with the policy's weights in every checkpoint.
    """
    from shapeflow.runtime.models import Critic, new_value_head

    return Critic(head=new_value_head(policy.model, seed), model=None, lr=lr, source="value_head")


class CriticParams(StageParams):
    path: str = Field(description="A local Hugging Face checkpoint folder or 'builtin:NAME'; its body (not its "
                      "language-model head) gives the hidden states the value head reads. verl initialises the "
                      "critic from the same base model as the policy.")
    lr: float | None = Field(None, gt=0, le=1, description="The critic's learning rate (verl critic.optim.lr, "
                             "1e-5 in its PPO examples against the actor's 1e-6); none: train.lr.")
    seed: int = Field(0, ge=0, description="Seed of the value head's initialisation.")


@stage("models.critic", kind="model", inputs={}, output="Model", params=CriticParams, phase="setup",
       provides=("values", "current_values"), paper=_GAE_PAPER)
def critic(*, path, lr, seed):
    """A separate critic: a transformer of its own with a value head V(s_t) = w·h_t + b (verl).

    It runs its own forward on every batch (prompt shared per group, as the policy's), is
    trained by the value loss alone, with the policy's optimizer settings and its own learning
    rate, and is saved in every checkpoint beside the policy.
    """
    from shapeflow.runtime.models import Critic, load_policy, new_value_head

    model = load_policy(path).model
    return Critic(head=new_value_head(model, seed), model=model, lr=lr, source=path)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def gae(rewards: "torch.Tensor", values: "torch.Tensor", mask: "torch.Tensor", gamma: float,
        lam: float) -> "torch.Tensor":
    """(B, T) Â_t of GAE, as verl's backward loop (values and advantages carry over padding).

        δ_t  = r_t + γ·V'_{t+1} − V_t
        Â_t  = δ_t + γλ·Â'_{t+1}
        V'_t = V_t·m_t + (1 − m_t)·V'_{t+1},   Â'_t = Â_t·m_t + (1 − m_t)·Â'_{t+1}

    One pass over T with (B,) operations, vectorised over the batch. Positions outside the mask
    hold what the recursion gives there (as verl's); callers mask them."""
    B, T = rewards.shape
    r, v, m = (x.t().contiguous() for x in (rewards, values, mask.to(rewards.dtype)))  # (T, B)
    out = torch.empty_like(r)
    next_value = torch.zeros(B, dtype=r.dtype, device=r.device)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in range(T - 1, -1, -1):
        delta = r[t] + gamma * next_value - v[t]
        adv = delta + gamma * lam * last
        next_value = v[t] * m[t] + (1 - m[t]) * next_value
        last = adv * m[t] + (1 - m[t]) * last
        out[t] = adv
    return out.t()


def _gae_inputs(rewards, groups):
    mask = groups.mask
    values = torch.where(mask > 0, groups.need("values").to(torch.float32), 0.0)
    r = place_at_last_token(rewards.to(torch.float32), mask)  # an outcome reward lands on the last token
    return r, values, mask


class GaeParams(StageParams):
    gamma: float = Field(1.0, ge=0, le=1, description="γ, the discount (verl algorithm.gamma 1.0).")
    lam: float = Field(1.0, ge=0, le=1, description="λ of GAE (verl algorithm.lam 1.0; 0.95 is common).")


class GaeAdvantageParams(GaeParams):
    whiten: bool = Field(True, description="Whiten Â over the batch's valid tokens (verl masked_whiten: mean and "
                         "Bessel-corrected variance, eps 1e-8 under the square root).")


@stage("gae", kind="advantage", inputs={"rewards": "Signal[*]", "groups": "Rollouts"}, output="Advantage[tok]",
       params=GaeAdvantageParams, needs=("values",), paper=_GAE_PAPER)
def gae_advantage(rewards, groups, *, gamma, lam, whiten):
    """Generalised advantage estimation against the critic's old values (PPO).

        δ_t = r_t + γ·V_{t+1} − V_t,   Â_t = Σ_l (γλ)^l δ_{t+l}       (V after the last token: 0)
        A   = masked_whiten(Â)                                        (whiten = true, verl)

    ``rewards`` per token (a KL-in-reward term, say) or per response (placed on its last token,
    as verl's outcome reward). Values come from the critic (``models.value_head`` or
    ``models.critic``) at the behaviour pass. verl iterates backwards and carries the next
    value and advantage across padding; so does this. Example (γ = λ = 1, no whitening): rewards
    [0, 0, 1] and values [0.5, 0.6, 0.7] give Â = [0.5, 0.4, 0.3]; with γ = 0.9, λ = 0.5:
    δ = [0.04, 0.03, 0.30], Â = [0.11425, 0.165, 0.30]. Zero on padding.
    """
    r, values, mask = _gae_inputs(rewards, groups)
    adv = gae(r, values, mask, gamma, lam)
    if whiten:
        return masked_whiten(adv, mask)
    return torch.where(mask > 0, adv, 0.0)


@stage("gae_returns", kind="signal", inputs={"rewards": "Signal[*]", "groups": "Rollouts"}, output="Signal[tok]",
       params=GaeParams, needs=("values",), paper=_GAE_PAPER)
def gae_returns(rewards, groups, *, gamma, lam):
    """The critic's regression target: R_t = Â_t + V_t (GAE before whitening, plus the old value).

    As verl's ``returns``; give it the same γ, λ and rewards as ``gae``. Example (γ = λ = 1):
    rewards [0, 0, 1], values [0.5, 0.6, 0.7] → R = [1, 1, 1]. Zero on padding.
    """
    r, values, mask = _gae_inputs(rewards, groups)
    return torch.where(mask > 0, gae(r, values, mask, gamma, lam) + values, 0.0)


# --------------------------------------------------------------------------------------------
# the value loss
# --------------------------------------------------------------------------------------------


class ValueLossParams(AggregationParams):
    clip: float | None = Field(0.5, gt=0, le=1e6, description="c: the new value is kept within V_old ± c in the "
                               "clipped term (verl critic.cliprange_value 0.5); none: no clipping.")


@stage("losses.value", kind="loss", inputs={"returns": "Signal[tok]", "groups": "Rollouts"}, output="Loss",
       params=ValueLossParams, needs=("values", "current_values"), phase="update", paper=_GAE_PAPER)
def value_loss(returns, groups, *, clip, agg, loss_scale_factor):
    """PPO's clipped value loss for the critic (verl ``compute_value_loss``).

        ℓ_t = ½ · max( (V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)² )
        L   = agg(ℓ)

    V the critic's current values (with gradient), V_old its values at the behaviour pass, R
    the returns (``gae_returns``). Example: V = 1.0, V_old = 0.2, R = 0.5, c = 0.5: the clipped
    value is 0.7, ℓ = ½·max(0.25, 0.04) = 0.125.
    """
    mask = groups.mask
    valid = mask > 0
    current = torch.where(valid, groups.need("current_values"), 0.0)  # padding may hold anything: 0 here
    old = torch.where(valid, groups.need("values").to(current.dtype), 0.0)
    target = torch.where(valid, returns.to(current.dtype), 0.0)
    err = (current - target) ** 2  # 0 on padding, as every term below
    if clip is not None:
        err = torch.maximum(err, (old + (current - old).clamp(-clip, clip) - target) ** 2)
    half = current.new_full((mask.shape[0], 1), 0.5)  # the ½, applied to the row sums
    return aggregate(err, mask, agg, loss_scale_factor, weight=half, padding="zero")
