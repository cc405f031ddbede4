"""Policy losses beyond PPO (catalog B8, B13–B17, GMPO, SAPO): worked examples by hand, parity
with independent reference code written here from the catalog's formulas, and properties.

The references below are plain tensor code (no shapeflow helpers): each one is the formula as
the catalog (or, for SAPO, TRL) writes it, on inputs whose padding is already zero.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from conftest import call, make_batch  # noqa: E402
from shapeflow.runtime.batch import MissingNeed  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402

D = torch.float64
NAN = float("nan")
PROPS = settings(derandomize=True, max_examples=40, deadline=None, database=None)
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def close(got, want, tol=1e-9):
    got = torch.as_tensor(got, dtype=D).flatten().tolist()
    want = torch.as_tensor(want, dtype=D).flatten().tolist()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= tol, (got, want)


def rel_close(got, want, rtol=1e-5):
    """Parity: |got − want| ≤ rtol · |want| elementwise (plus a floor for exact zeros)."""
    got = torch.as_tensor(got, dtype=D).flatten()
    want = torch.as_tensor(want, dtype=D).flatten()
    assert got.shape == want.shape
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    assert ((got - want).abs() <= rtol * want.abs() + 1e-12).all(), (got.tolist(), want.tolist())


def tensor(x):
    return x.clone().to(D) if torch.is_tensor(x) else torch.tensor(x, dtype=D)


def run(name, adv, lp, old=None, mask=None, *, ref=None, **params):
    """Call loss ``name`` with grad on log π_θ; returns (loss, ∂loss/∂log π_θ)."""
    logp = tensor(lp).requires_grad_(True)
    if mask is None:
        mask = [[1] * logp.shape[1]] * logp.shape[0]
    batch = make_batch(range(logp.shape[0]), mask, policy_logprobs=logp,
                       logprobs=None if old is None else tensor(old),
                       ref_logprobs=None if ref is None else tensor(ref))
    inputs = (batch,) if adv is None else (tensor(adv), batch)
    loss = call(name, *inputs, **params)
    loss.backward()
    return loss.detach(), logp.grad


# --------------------------------------------------------------------------------------------
# independent references (catalog formulas; verl/TRL conventions); inputs are clean (pad = 0)
# --------------------------------------------------------------------------------------------

def ref_agg(loss, mask, mode, scale=None):
    """Catalog B11 (verl agg_loss), written out."""
    m = mask.to(loss.dtype)
    lengths = m.sum(-1)
    nonempty = (lengths > 0).to(loss.dtype)
    if mode == "token-mean":
        return (loss * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return ((loss * m).sum(-1) * nonempty).sum() / nonempty.sum()
    if mode == "seq-mean-token-mean":
        return ((loss * m).sum(-1) / (lengths + 1e-8) * nonempty).sum() / nonempty.sum()
    assert mode == "seq-mean-token-sum-norm"
    return (loss * m).sum() / (scale if scale is not None else mask.shape[-1])


def adv_tokens(adv, mask):
    return adv[:, None].expand(mask.shape).clone() if adv.dim() == 1 else adv


def ref_gspo_verl(adv, logp, old, mask, eps_low, eps_high):
    m = mask.to(logp.dtype)
    a = adv_tokens(adv, mask)
    neg_kl = logp - old
    seq = (neg_kl * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    losses = torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps_low, 1 + eps_high))
    return ref_agg(losses, mask, "seq-mean-token-mean")


def ref_gspo_trl(adv, logp, old, mask, eps_low, eps_high):
    """TRL importance_sampling_level="sequence": exp(mean log-ratio), full gradient, grpo loss."""
    m = mask.to(logp.dtype)
    log_w = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_w).unsqueeze(-1)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def ref_sapo_trl(adv, logp, old, mask, tau_pos, tau_neg, agg):
    a = adv_tokens(adv, mask)
    coef_1 = torch.exp(logp - old)
    temperatures = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))
    soft = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    return ref_agg(-soft * a, mask, agg)


def ref_gpg(adv, logp, mask, agg, scale=None):
    return ref_agg(-logp * adv_tokens(adv, mask), mask, agg, scale)


def ref_cispo_verl(adv, logp, old, mask, eps_low, eps_high, agg):
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    r_hat = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()
    return ref_agg(-r_hat * adv_tokens(adv, mask) * logp, mask, agg)


def ref_cispo_trl(adv, logp, old, mask, eps_high, agg):
    coef_1 = torch.exp(logp - old)
    clamped = torch.clamp(coef_1, max=eps_high).detach()
    return ref_agg(-clamped * adv_tokens(adv, mask) * logp, mask, agg)


def masked_mean_verl(v, mask):
    return (v * mask).sum() / (mask.sum() + 1e-8)


def ref_clip_cov(adv, logp, old, mask, eps_low, eps_high, ratio_, lb, ub, agg):
    """verl compute_policy_loss_clip_cov, step by step (global-RNG torch.randperm)."""
    a = adv_tokens(adv, mask)
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old)
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip_by_origin = (pg2 > pg1) & (m > 0)
    cov_all = (a - masked_mean_verl(a, m)) * (logp - masked_mean_verl(logp.detach(), m))
    cov_all = cov_all.detach().clone()
    cov_all[m == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio_ * m.sum().item()), 1)
    idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (m > 0))
    corr = torch.ones_like(a)
    if len(idx) > 0:
        perm = torch.randperm(len(idx))
        idx = idx[perm[: min(clip_num, len(idx))]]
        corr[idx[:, 0], idx[:, 1]] = 0
    return ref_agg(torch.maximum(pg1, pg2) * corr, mask, agg), corr


def ref_kl_cov(adv, logp, old, mask, ratio_, coef, agg):
    """verl compute_policy_loss_kl_cov, step by step."""
    a = adv_tokens(adv, mask)
    neg_kl = logp - old
    ratio = torch.exp(neg_kl)
    pg_losses = -a * ratio
    pg_kl = -a * ratio + coef * neg_kl.abs()
    valid = mask > 0
    valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    va = a[valid].detach().reshape(-1)
    vl = logp[valid].detach().reshape(-1)
    cov = (va - va.mean()) * (vl - vl.mean())
    k = max(1, int(len(cov) * ratio_))
    top = valid_idx[torch.topk(cov, k, largest=True).indices]
    T = a.shape[1]
    pg_losses = pg_losses.clone()
    pg_losses[top // T, top % T] = pg_kl[top // T, top % T]
    return ref_agg(pg_losses, mask, agg)


def ref_gmpo(adv, logp, old, mask, eps_low, eps_high):
    """verl compute_policy_loss_geo_mean."""
    a = adv_tokens(adv, mask)
    m = mask.to(logp.dtype)
    neg_kl = logp - old
    sgn = torch.sign(a)
    clamped = torch.clamp(neg_kl, -eps_low, eps_high)
    kl_min = sgn * torch.min(sgn * neg_kl, sgn * clamped)
    n = m.sum(-1)
    ratio = torch.exp((kl_min * m).sum(-1) / (n + 1e-8))
    seq_adv = (a * m).sum(-1) / (n + 1e-8)
    return torch.mean(-seq_adv * ratio)


def ref_kl(logp, ref, estimator):
    d = logp - ref
    if estimator.endswith("+"):
        value = ref_kl(logp, ref, estimator[:-1]).detach()
        backward = 0.5 * d.square()
        return backward - backward.detach() + value
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d.square()
    kl = torch.clamp(ref - logp, -20, 20)
    return torch.clamp(torch.exp(kl) - kl - 1, -10, 10)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------

NEW_LOSSES = ("losses.gspo", "losses.sapo", "losses.gpg", "losses.cispo", "losses.clip_cov", "losses.kl_cov",
              "losses.gmpo", "losses.entropy_bonus")


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_loss_contract(name):
    stg = default_registry()[name]
    assert stg.kind == "loss" and stg.phase == "update" and str(stg.output) == "Loss"
    assert "arXiv" in stg.paper or "catalog" in stg.paper
    assert "Example" in stg.doc
    for fname, info in stg.params.model_fields.items():
        assert info.description, f"{name}.{fname}"
    assert "agg" in stg.param_names()
    if name in ("losses.gspo", "losses.gmpo"):  # the method fixes its reduction
        assert "loss_scale_factor" not in stg.param_names()
    else:
        assert "loss_scale_factor" in stg.param_names()


def test_needs_declared():
    reg = default_registry()
    assert reg["losses.gpg"].needs == {"policy_logprobs"}
    assert reg["losses.entropy_bonus"].needs == {"policy_entropy"}
    for name in ("losses.gspo", "losses.sapo", "losses.cispo", "losses.clip_cov", "losses.kl_cov", "losses.gmpo"):
        assert reg[name].needs == {"logprobs", "policy_logprobs"}, name


@pytest.mark.parametrize(
    "name, key, value, why",
    [
        ("losses.gspo", "agg", "token-mean", "GSPO fixes its aggregation to seq-mean-token-mean"),
        ("losses.gspo", "agg", "seq-mean-token-sum-norm", "GSPO fixes"),
        ("losses.gspo", "loss_scale_factor", 4.0, "GSPO fixes"),
        ("losses.gmpo", "agg", "token-mean", "plain mean over the rows"),
        ("losses.gmpo", "agg", "seq-mean-token-mean", "plain mean over the rows"),
        ("losses.gmpo", "loss_scale_factor", 4.0, "plain mean over the rows"),
    ],
)
def test_fixed_aggregation_refuses_agg(name, key, value, why):
    with pytest.raises(ValidationError, match=why):
        default_registry()[name].params(**{key: value})


def test_fixed_aggregation_accepts_the_method_own():
    p = default_registry()["losses.gspo"].params
    assert p(agg="seq-mean-token-mean") == p()
    assert default_registry()["losses.gmpo"].params().agg is None


def test_fixed_aggregation_error_reaches_a_spec(tmp_path):
    from shapeflow.compiler.pipeline import compile_spec  # noqa: PLC0415

    spec = tmp_path / "t.shape"
    spec.write_text(
        'spec t { title = "t" }\n'
        'model     policy  = models.causal_lm("builtin:arith-tiny")\n'
        'data      prompts = tasks.arithmetic(digits = 2, second_digits = 1, split = "train")\n'
        "rollout   groups  = rollouts.sample(policy, prompts, n = 4, max_new_tokens = 5)\n"
        "verify    correct = verifiers.exact_answer(groups)\n"
        "reward    r       = correct\n"
        "advantage adv     = grpo(r, groups)\n"
        'objective loss    = losses.gspo(adv, groups, agg = "token-mean")\n'
        "train { steps = 1  prompts_per_step = 2  lr = 1e-4  seed = 0 }\n",
        encoding="utf-8",
    )
    compiled = compile_spec(spec)
    assert not compiled.ok
    text = "\n".join(d.message for d in compiled.diagnostics)
    assert "GSPO fixes its aggregation to seq-mean-token-mean" in text, text


def test_missing_needs():
    batch = make_batch([0], [[1]], policy_logprobs=[[0.0]])
    with pytest.raises(MissingNeed, match="logprobs"):
        call("losses.gspo", torch.tensor([1.0]), batch)
    with pytest.raises(MissingNeed, match="policy_entropy"):
        call("losses.entropy_bonus", batch)


# --------------------------------------------------------------------------------------------
# GSPO (catalog B13)
# --------------------------------------------------------------------------------------------

def test_gspo_worked_example():
    # log-ratios (0.1, −0.3): log s = −0.1, s = e^−0.1 = 0.904837 < 1 − 3e-4, A = 1 → unclipped side
    s = math.exp(-0.1)
    loss, grad = run("losses.gspo", [1.0], [[0.1, -0.3]], [[0.0, 0.0]])
    close(loss, -s, 1e-12)
    close(grad, [-s / 2, -s / 2], 1e-12)  # s · ∇log π_t, ÷ |y| = 2
    # A = −1: −A·clip(s) = 0.9997 > 0.904837 → the clip binds, no gradient on any token
    loss, grad = run("losses.gspo", [-1.0], [[0.1, -0.3]], [[0.0, 0.0]])
    close(loss, 1 - 3e-4, 1e-12)
    close(grad, [0.0, 0.0], 0.0)


def test_gspo_fixed_seq_mean_token_mean():
    # rows: (A=1, log-ratios 0, 0, 0 → s = 1, ℓ = −1 each) and (A=2, 1 token, s = 1 → ℓ = −2)
    loss, _ = run("losses.gspo", [1.0, 2.0], [[0.0, 0.0, 0.0], [0.0, NAN, NAN]], [[0.0, 0.0, 0.0], [0.0, NAN, NAN]],
                  [[1, 1, 1], [1, 0, 0]])
    close(loss, (-1.0 + -2.0) / 2, 1e-12)  # per-row means, then the mean of rows (token-mean: −5/4)


def test_gspo_gradient_is_sequence_ratio_times_token_gradient():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    logp = -torch.rand(4, 5, generator=g, dtype=D) * 2
    old = logp - 0.05 * torch.randn(4, 5, generator=g, dtype=D)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=D)
    eps = dict(eps_low=0.2, eps_high=0.2)  # wide enough that no row is clipped
    loss, grad = run("losses.gspo", adv, logp * mask, old * mask, mask, **eps)
    m = mask.to(D)
    n = m.sum(-1)
    s = torch.exp(((logp - old) * m).sum(-1) / n)
    assert ((s > 0.8) & (s < 1.2)).all()
    close(grad, (-adv * s / n / 4)[:, None] * m, 1e-12)  # ∂L/∂log π_{i,t} = −A_i s_i / (|y_i| · B)
    # TRL's full-gradient exp(mean log-ratio) form: the same loss and the same gradient
    lp = logp.clone().requires_grad_(True)
    want = ref_gspo_trl(adv, lp * m, old * m, m, 0.2, 0.2)
    want.backward()
    close(loss, want.item(), 1e-12)
    close(grad, lp.grad, 1e-12)
    # and with the default (3e-4, 4e-4) clip, on the same batch
    lp2 = logp.clone().requires_grad_(True)
    want2 = ref_gspo_trl(adv, lp2 * m, old * m, m, 3e-4, 4e-4)
    want2.backward()
    loss2, grad2 = run("losses.gspo", adv, logp * mask, old * mask, mask)
    close(loss2, want2.item(), 1e-12)
    close(grad2, lp2.grad, 1e-12)


def test_gspo_log_ratio_clamped_at_10():
    # mean log-ratio 12 → s = e^10, not e^12 (verl's clamp); A = −1: ℓ = e^10
    loss, _ = run("losses.gspo", [-1.0], [[12.0]], [[0.0]])
    assert loss.item() == pytest.approx(math.exp(10), rel=1e-12)


# --------------------------------------------------------------------------------------------
# SAPO
# --------------------------------------------------------------------------------------------

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_sapo_worked_example():
    # A = 1, r = 1.5, τ_pos = 1: f = 4 σ(0.5) = 2.489837; ∂ℓ/∂log π = −4 σ(1 − σ) r
    p = sigmoid(0.5)
    loss, grad = run("losses.sapo", [1.0], [[math.log(1.5)]], [[0.0]])
    close(loss, -4 * p, 1e-12)
    assert -4 * p == pytest.approx(-2.489837, abs=1e-6)
    close(grad, [-4 * p * (1 - p) * 1.5], 1e-12)
    # A = −1 uses τ_neg = 1.05: f = σ(1.05 · 0.5) · 4 / 1.05
    q = sigmoid(0.525)
    loss, grad = run("losses.sapo", [-1.0], [[math.log(1.5)]], [[0.0]])
    close(loss, 4 * q / 1.05, 1e-12)
    close(grad, [4 * q * (1 - q) * 1.5], 1e-12)


def test_sapo_on_policy_gradient_is_plain_policy_gradient():
    # at r = 1 every token's gradient is −A (σ'(0) · 4 = 1), whatever τ; the value is −2A/τ
    for tau in (0.5, 1.0, 3.0):
        loss, grad = run("losses.sapo", [[2.0, -1.0]], [[-0.3, -1.2]], [[-0.3, -1.2]], agg="token-mean",
                         tau_pos=tau, tau_neg=tau)
        close(grad, [-2.0 / 2, 1.0 / 2], 1e-12)
        close(loss, (-2 * 2.0 / tau + 2 * 1.0 / tau) / 2, 1e-12)


def test_sapo_default_aggregation_is_per_response_mean():
    # on-policy: ℓ = −2A/τ. rows (A=1: 2 tokens, τ=1 → −2, −2) and (A=−1: 1 token, τ=1.05 → 2/1.05)
    mask = [[1, 1], [1, 0]]
    loss, _ = run("losses.sapo", [1.0, -1.0], [[0.0, 0.0], [0.0, NAN]], [[0.0, 0.0], [0.0, NAN]], mask)
    close(loss, (-2.0 + 2 / 1.05) / 2, 1e-12)
    loss, _ = run("losses.sapo", [1.0, -1.0], [[0.0, 0.0], [0.0, NAN]], [[0.0, 0.0], [0.0, NAN]], mask,
                  agg="token-mean")
    close(loss, (-4.0 + 2 / 1.05) / 3, 1e-12)


# --------------------------------------------------------------------------------------------
# GPG (catalog B8)
# --------------------------------------------------------------------------------------------

def test_gpg_worked_example():
    # ℓ = −A log π: (A=2, log π=−0.5) → 1.0; (A=−1, log π=−2) → −2; token-mean −0.5; ∂/∂log π = −A/2
    loss, grad = run("losses.gpg", [2.0, -1.0], [[-0.5], [-2.0]])
    close(loss, -0.5, 1e-12)
    close(grad, [-1.0, 0.5], 1e-12)
    loss, grad = run("losses.gpg", [2.0, -1.0], [[-0.5], [-2.0]], agg="seq-mean-token-sum-norm",
                     loss_scale_factor=4.0)
    close(loss, -1.0 / 4, 1e-12)
    close(grad, [-0.5, 0.25], 1e-12)


def test_gpg_needs_no_behaviour_logprobs():
    loss, _ = run("losses.gpg", [1.0], [[-1.0, -3.0]])  # no `logprobs` in the batch at all
    close(loss, 2.0, 1e-12)


# --------------------------------------------------------------------------------------------
# CISPO (catalog B14)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mode, ratio, params, weight",
    [
        ("symmetric", 1.5, {}, 1.2),  # clip(1.5, 0.8, 1.2)
        ("symmetric", 0.5, {}, 0.8),
        ("symmetric", 1.1, {}, 1.1),
        ("symmetric", 1.5, {"eps_high": 0.28}, 1.28),
        ("symmetric", 0.5, {"eps_low": 0.9}, 0.5),
        ("absolute_upper", 1.5, {}, 1.5),  # min(1.5, 5)
        ("absolute_upper", 8.0, {}, 5.0),
        ("absolute_upper", 0.01, {}, 0.01),  # no lower bound
        ("absolute_upper", 3.0, {"eps_high": 2.0}, 2.0),
    ],
)
def test_cispo_worked_examples(mode, ratio, params, weight):
    # A = 1, log π = −0.5: ℓ = −w·A·log π = 0.5 w; ∂ℓ/∂log π = −w (the weight carries no gradient)
    loss, grad = run("losses.cispo", [1.0], [[-0.5]], [[-0.5 - math.log(ratio)]], cap_mode=mode, **params)
    close(loss, 0.5 * weight, 1e-12)
    close(grad, [-weight], 1e-12)


def test_cispo_params():
    p = default_registry()["losses.cispo"].params
    assert (p().eps_low, p().eps_high) == (0.2, 0.2)
    a = p(cap_mode="absolute_upper")
    assert (a.eps_low, a.eps_high) == (None, 5.0)
    assert p(**a.model_dump()) == a  # re-validating the dump is stable
    assert p(**p().model_dump()) == p()
    with pytest.raises(ValidationError, match="no lower bound"):
        p(cap_mode="absolute_upper", eps_low=0.2)
    with pytest.raises(ValidationError):
        p(eps_high=0.0)


# --------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (catalog B15)
# --------------------------------------------------------------------------------------------

COV_ADV = [2.0, -2.0]
COV_LOGP = [[0.0, -4.0], [-5.0, 0.0]]  # mean −2.25; cov = [[4.5, −3.5], [5.5, −4.5]]


def test_clip_cov_worked_example():
    # ρ = 1 everywhere (nothing PPO-clipped); candidates 1 < cov < 5: only (0, 0); n = max(int(2e-4·4), 1) = 1
    loss, grad = run("losses.clip_cov", COV_ADV, COV_LOGP, COV_LOGP)
    close(loss, (0.0 - 2.0 + 2.0 + 2.0) / 4, 1e-12)
    close(grad, [0.0, -0.5, 0.5, 0.5], 1e-12)  # −A ρ / 4, zero on the chosen token
    # widen the window to take in (1, 0) too: two candidates, one chosen at random
    torch.manual_seed(0)
    got = {run("losses.clip_cov", COV_ADV, COV_LOGP, COV_LOGP, cov_ub=6.0)[0].item() for _ in range(20)}
    assert got == {0.5, -0.5}  # zeroing (0, 0) gives (−2+2+2)/4, zeroing (1, 0) gives (−2−2+2)/4
    # cov_ratio 0.5: n = 2 → both candidates, deterministic
    close(run("losses.clip_cov", COV_ADV, COV_LOGP, COV_LOGP, cov_ub=6.0, cov_ratio=0.5)[0], 0.0, 1e-12)


def test_clip_cov_skips_ppo_clipped_tokens():
    # (0, 0) has A = 2 and ρ = 1.5: PPO-clipped, so it is no candidate even with cov in range
    old = [[-math.log(1.5), -4.0], [-5.0, 0.0]]
    loss, grad = run("losses.clip_cov", COV_ADV, COV_LOGP, old)
    close(loss, (-2 * 1.2 - 2.0 + 2.0 + 2.0) / 4, 1e-12)  # no token taken out
    close(grad, [0.0, -0.5, 0.5, 0.5], 1e-12)


def test_clip_cov_without_candidates_is_ppo_without_dual_clip():
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(3, 4, generator=g, dtype=D)
    old = logp + 0.3 * torch.randn(3, 4, generator=g, dtype=D)
    adv = torch.tensor([0.5, -1.0, 0.8], dtype=D)
    for agg in MODES:
        a, ga = run("losses.clip_cov", adv, logp, old, cov_lb=100.0, cov_ub=200.0, agg=agg)
        b, gb = run("losses.ppo_clip", adv, logp, old, clip_c=None, agg=agg)
        close(a, b.item(), 1e-12)
        close(ga, gb, 1e-12)


def cov_batch(seed, B=6, T=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    logp = -torch.rand(B, T, generator=g, dtype=D) * 6
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    sign = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0).to(D)
    adv = sign * (0.5 + 2.5 * torch.rand(B, generator=g, dtype=D))  # |A| ≥ 0.5: no zero advantages
    return adv, logp * mask, old * mask, mask


@pytest.mark.parametrize("cov_ratio", [1e-4, 0.02, 0.05, 0.5])
def test_clip_cov_selection_count(cov_ratio):
    adv, logp, old, mask = cov_batch(11)
    m = mask.to(D)
    a = adv[:, None].expand_as(logp)
    ratio = torch.exp(logp - old)
    clipped = (-a * ratio.clamp(0.8, 1.2)) > (-a * ratio)
    n_valid = m.sum()
    cov = (a - (a * m).sum() / n_valid) * (logp - (logp * m).sum() / n_valid)
    candidates = (m > 0) & ~clipped & (cov > 1.0) & (cov < 5.0)
    n_cand = int(candidates.sum())
    n = max(int(cov_ratio * n_valid.item()), 1)
    assert n_cand > 5  # the batch has real candidates
    torch.manual_seed(1234)
    _, grad = run("losses.clip_cov", adv, logp, old, mask, cov_ratio=cov_ratio)
    chosen = (grad == 0) & candidates  # a kept candidate has gradient −Aρ/N ≠ 0
    assert int(chosen.sum()) == min(n, n_cand)
    # the same tokens verl's procedure picks under the same seed
    torch.manual_seed(1234)
    _, corr = ref_clip_cov(adv, logp, old, mask, 0.2, 0.2, cov_ratio, 1.0, 5.0, "token-mean")
    assert torch.equal(chosen, (corr == 0) & (m > 0))


def test_clip_cov_uses_global_rng():
    adv, logp, old, mask = cov_batch(11)
    picks = []
    for seed in (0, 1, 2, 0):
        torch.manual_seed(seed)
        picks.append(run("losses.clip_cov", adv, logp, old, mask, cov_ratio=0.02)[1] == 0)
    assert torch.equal(picks[0], picks[3])  # same seed, same choice
    assert not (torch.equal(picks[0], picks[1]) and torch.equal(picks[0], picks[2]))


def test_kl_cov_worked_example():
    # every log-ratio 0.1, ρ = e^0.1; top-1 by cov = (1, 0) (5.5) gets + 0.1 · |0.1|
    old = [[v - 0.1 for v in row] for row in COV_LOGP]
    rho = math.exp(0.1)
    loss, grad = run("losses.kl_cov", COV_ADV, COV_LOGP, old)
    close(loss, 0.01 / 4, 1e-12)
    close(grad, [-2 * rho / 4, -2 * rho / 4, (2 * rho + 0.1) / 4, 2 * rho / 4], 1e-12)
    loss, grad = run("losses.kl_cov", COV_ADV, COV_LOGP, old, kl_coef=1.0)  # verl's fallback value
    close(loss, 0.1 / 4, 1e-12)


@pytest.mark.parametrize("cov_ratio", [1e-4, 0.02, 0.3])
def test_kl_cov_selection_is_top_k(cov_ratio):
    adv, logp, old, mask = cov_batch(7)
    m = mask.to(D)
    a = adv[:, None].expand_as(logp)
    valid = m > 0
    av, lv = a[valid], logp[valid]
    cov = torch.full_like(logp, -math.inf)
    cov[valid] = (av - av.mean()) * (lv - lv.mean())
    k = max(1, int(valid.sum().item() * cov_ratio))
    _, grad = run("losses.kl_cov", adv, logp, old, mask, cov_ratio=cov_ratio, kl_coef=0.5)
    n = m.sum()
    plain = -a * torch.exp(logp - old) / n
    penalised = valid & ((grad - plain).abs() > 1e-12)  # the kl term adds 0.5·sign(Δ)/N
    assert int(penalised.sum()) == k
    assert cov[penalised].min() >= cov[valid & ~penalised].max()
    close(grad[penalised], (plain + 0.5 * torch.sign(logp - old) / n)[penalised], 1e-12)


# --------------------------------------------------------------------------------------------
# GMPO (README corner case: verl geo_mean)
# --------------------------------------------------------------------------------------------

def test_gmpo_worked_example():
    rho = math.exp(0.1)
    # A = 1: Δ = (0.6, −0.2) → pessimistic clip (0.4, −0.2), mean 0.1
    loss, grad = run("losses.gmpo", [1.0], [[0.6, -0.2]], [[0.0, 0.0]])
    close(loss, -rho, 1e-7)
    close(grad, [0.0, -rho / 2], 1e-7)
    # A = −1: Δ = (0.6, −0.6) → (0.6, −0.4): the high side is left alone for a negative advantage
    loss, grad = run("losses.gmpo", [-1.0], [[0.6, -0.6]], [[0.0, 0.0]])
    close(loss, rho, 1e-7)
    close(grad, [rho / 2, 0.0], 1e-7)


def test_gmpo_zero_advantage_tokens_and_plain_row_mean():
    # token advantages (2, 0, 2): the A = 0 token's log-ratio counts as 0 but it stays in |y| = 3;
    # Ā = 4/3, log ρ = (0.1 + 0 + 0.1)/3; second row empty → term 0, still counted in the mean of 2 rows
    adv = [[2.0, 0.0, 2.0], [5.0, 5.0, 5.0]]
    loss, grad = run("losses.gmpo", adv, [[0.1, 0.3, 0.1], [NAN] * 3], [[0.0, 0.0, 0.0], [NAN] * 3],
                     [[1, 1, 1], [0, 0, 0]])
    rho = math.exp(0.2 / 3)
    close(loss, (-(4 / 3) * rho + 0.0) / 2, 1e-7)
    close(grad, [-(4 / 3) * rho / 3 / 2, 0.0, -(4 / 3) * rho / 3 / 2, 0.0, 0.0, 0.0], 1e-7)


# --------------------------------------------------------------------------------------------
# entropy bonus (catalog B17)
# --------------------------------------------------------------------------------------------

def entropy_run(h, mask, **params):
    h = tensor(h).requires_grad_(True)
    batch = make_batch(range(h.shape[0]), mask, extra={"policy_entropy": h})
    loss = call("losses.entropy_bonus", batch, **params)
    loss.backward()
    return loss.detach(), h.grad


def test_entropy_bonus_worked_example():
    h, mask = [[1.0, 2.0], [0.5, NAN]], [[1, 1], [1, 0]]
    loss, grad = entropy_run(h, mask)
    close(loss, 3.5 / 3, 1e-12)
    close(grad, [1 / 3, 1 / 3, 1 / 3, 0.0], 1e-12)
    close(entropy_run(h, mask, agg="seq-mean-token-mean")[0], (1.5 + 0.5) / 2, 1e-12)
    close(entropy_run(h, mask, agg="seq-mean-token-sum")[0], (3.0 + 0.5) / 2, 1e-12)


# --------------------------------------------------------------------------------------------
# KL straight-through estimators (catalog B16)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "estimator, value",
    [("k1+", 0.5), ("k3+", math.exp(-0.5) - 0.5), ("abs+", 0.5), ("k1+", -0.5), ("abs+", -0.5)],
)
def test_kl_straight_through_worked_example(estimator, value):
    delta = 0.5 if value > 0 else -0.5
    want = {"k1+": delta, "abs+": abs(delta)}.get(estimator, value)
    loss, grad = run("losses.kl", None, [[delta]], ref=[[0.0]], estimator=estimator)
    close(loss, want, 1e-12)
    close(grad, [delta], 1e-12)  # ∂k2/∂log π = Δ


def test_kl_straight_through_matches_value_and_k2_gradient():
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logp = -torch.rand(2, 4, generator=g, dtype=D) * 3 * mask
    ref = -torch.rand(2, 4, generator=g, dtype=D) * 3 * mask
    for base in ("k1", "k3", "abs"):
        for agg in MODES:
            v_plus, g_plus = run("losses.kl", None, logp, mask=mask, ref=ref, estimator=base + "+", agg=agg)
            v_base, _ = run("losses.kl", None, logp, mask=mask, ref=ref, estimator=base, agg=agg)
            _, g_k2 = run("losses.kl", None, logp, mask=mask, ref=ref, estimator="k2", agg=agg)
            close(v_plus, v_base.item(), 1e-12)
            close(g_plus, g_k2, 1e-12)


# --------------------------------------------------------------------------------------------
# parity with the references, 1e-5 relative, values and gradients
# --------------------------------------------------------------------------------------------

def parity_batch(seed, *, B=5, T=6, token_adv=False, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[2] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 3) * mask
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=D)) * mask
    ref = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=D)) * mask
    shape = (B, T) if token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=D) * 1.5
    if token_adv:
        adv = adv * mask
    return adv, logp, old, ref, mask


def check_parity(name, ref_fn, adv, logp, old, mask, *, seed=None, ref=None, **params):
    if seed is not None:
        torch.manual_seed(seed)
    got, grad = run(name, adv, logp, old, mask, ref=ref, **params)
    lp = logp.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    want = ref_fn(lp)
    want.backward()
    rel_close(got, want.detach())
    rel_close(grad, lp.grad)


SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("token_adv", [False, True])
def test_parity_gspo(seed, token_adv):
    adv, logp, old, _, mask = parity_batch(seed, token_adv=token_adv)
    for eps in ((3e-4, 4e-4), (0.2, 0.28), (0.5, 0.5)):
        check_parity("losses.gspo", lambda lp: ref_gspo_verl(adv, lp, old, mask, *eps), adv, logp, old, mask,
                     eps_low=eps[0], eps_high=eps[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_sapo(seed, agg):
    adv, logp, old, _, mask = parity_batch(seed, token_adv=seed % 2 == 1)
    for taus in ((1.0, 1.05), (0.5, 4.0)):
        check_parity("losses.sapo", lambda lp: ref_sapo_trl(adv, lp, old, mask, *taus, agg), adv, logp, old, mask,
                     tau_pos=taus[0], tau_neg=taus[1], agg=agg)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_gpg(seed, agg):
    adv, logp, _, _, mask = parity_batch(seed, token_adv=seed % 2 == 0)
    check_parity("losses.gpg", lambda lp: ref_gpg(adv, lp, mask, agg), adv, logp, None, mask, agg=agg)
    if agg == "seq-mean-token-sum-norm":
        check_parity("losses.gpg", lambda lp: ref_gpg(adv, lp, mask, agg, 32.0), adv, logp, None, mask, agg=agg,
                     loss_scale_factor=32.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_cispo(seed, agg):
    adv, logp, old, _, mask = parity_batch(seed, token_adv=seed % 2 == 1)
    check_parity("losses.cispo", lambda lp: ref_cispo_verl(adv, lp, old, mask, 0.2, 0.2, agg), adv, logp, old, mask,
                 agg=agg)
    check_parity("losses.cispo", lambda lp: ref_cispo_verl(adv, lp, old, mask, 0.1, 0.28, agg), adv, logp, old,
                 mask, agg=agg, eps_low=0.1, eps_high=0.28)
    check_parity("losses.cispo", lambda lp: ref_cispo_trl(adv, lp, old, mask, 5.0, agg), adv, logp, old, mask,
                 agg=agg, cap_mode="absolute_upper")
    check_parity("losses.cispo", lambda lp: ref_cispo_trl(adv, lp, old, mask, 1.1, agg), adv, logp, old, mask,
                 agg=agg, cap_mode="absolute_upper", eps_high=1.1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_clip_cov(seed, agg):
    adv, logp, old, mask = cov_batch(100 + seed, B=5, T=12)
    if seed % 2:
        adv = adv[:, None] * (1 + 0.3 * torch.rand(5, 12, dtype=D)) * mask  # token-level advantage
    for ratio_ in (2e-4, 0.05, 0.3):
        check_parity(
            "losses.clip_cov",
            lambda lp: ref_clip_cov(adv, lp, old, mask, 0.2, 0.28, ratio_, 1.0, 5.0, agg)[0],
            adv, logp, old, mask, seed=seed, agg=agg, eps_high=0.28, cov_ratio=ratio_,
        )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_kl_cov(seed, agg):
    adv, logp, old, _, mask = parity_batch(seed, B=6, T=10, token_adv=seed % 2 == 1)
    for ratio_, coef in ((2e-4, 0.1), (0.1, 1.0), (0.5, 0.3)):
        check_parity("losses.kl_cov", lambda lp: ref_kl_cov(adv, lp, old, mask, ratio_, coef, agg), adv, logp, old,
                     mask, agg=agg, cov_ratio=ratio_, kl_coef=coef)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("token_adv", [False, True])
def test_parity_gmpo(seed, token_adv):
    adv, logp, old, _, mask = parity_batch(seed, token_adv=token_adv)
    if token_adv:
        adv[0, 0] = 0.0  # a zero-advantage token
    for eps in ((0.4, 0.4), (0.2, 0.3)):
        check_parity("losses.gmpo", lambda lp: ref_gmpo(adv, lp, old, mask, *eps), adv, logp, old, mask,
                     eps_low=eps[0], eps_high=eps[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", MODES)
def test_parity_entropy_bonus(seed, agg):
    _, logp, _, _, mask = parity_batch(seed)
    h = -logp  # any non-negative per-token values
    got, grad = entropy_run(h, mask, agg=agg)
    hh = h.clone().requires_grad_(True)
    want = ref_agg(hh, mask, agg)
    want.backward()
    rel_close(got, want.detach())
    rel_close(grad, hh.grad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"])
def test_parity_kl(seed, estimator):
    _, logp, _, ref, mask = parity_batch(seed)
    for agg in MODES:
        check_parity("losses.kl", lambda lp: ref_agg(ref_kl(lp, ref, estimator), mask, agg), None, logp, None, mask,
                     ref=ref, estimator=estimator, agg=agg)


# --------------------------------------------------------------------------------------------
# properties: finite, padding contributes nothing (whatever it holds), row order does not matter
# --------------------------------------------------------------------------------------------

@st.composite
def token_batch(draw, *, max_b=4, max_t=5):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = [[1.0 if j < n else 0.0 for j in range(t)] for n in lengths]
    logp = st.floats(-8.0, 0.0, allow_nan=False)
    grid = st.lists(st.lists(logp, min_size=t, max_size=t), min_size=b, max_size=b)
    adv = st.lists(st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=t, max_size=t), min_size=b, max_size=b)
    return mask, draw(grid), draw(grid), draw(grid), draw(adv), draw(st.booleans())


GARBAGE = (NAN, float("inf"), -float("inf"), 1e30)

# (name, params for the padding check, params for the permutation check)
PROPERTY_CASES = [
    ("losses.gspo", {}, {}),
    ("losses.gspo", {"eps_low": 0.2, "eps_high": 0.2}, {"eps_low": 0.2, "eps_high": 0.2}),
    ("losses.sapo", {}, {}),
    ("losses.gpg", {}, {}),
    ("losses.cispo", {}, {}),
    ("losses.cispo", {"cap_mode": "absolute_upper"}, {"cap_mode": "absolute_upper"}),
    # Clip-Cov's random choice: the padding check reseeds (same layout, same draw); the permutation
    # check takes every candidate (cov_ratio 1), so the choice does not depend on row order
    ("losses.clip_cov", {"cov_lb": -100.0, "cov_ub": 100.0, "cov_ratio": 0.3}, {"cov_lb": -100.0, "cov_ratio": 1.0}),
    ("losses.kl_cov", {"cov_ratio": 0.3}, {"cov_ratio": 1.0}),  # ties in cov: all tokens for the permutation
    ("losses.gmpo", {}, {}),
    ("losses.entropy_bonus", {}, {}),
    ("losses.kl", {"estimator": "k3+"}, {"estimator": "k3+"}),
    ("losses.kl", {"estimator": "abs+"}, {"estimator": "abs+"}),
]
FIXED_AGG = ("losses.gspo", "losses.gmpo")


def build(name, mask, lp, old, ref, adv, *, fill, seq_adv, rows=None):
    """Inputs for ``name`` with ``fill`` in every padded position; lp carries the gradient."""
    rows = list(range(len(mask))) if rows is None else rows
    mask = [mask[i] for i in rows]

    def grid(values):
        return torch.tensor([[v if m else fill for v, m in zip(values[i], mask_row)]
                             for i, mask_row in zip(rows, mask)], dtype=D)

    logp = grid(lp).requires_grad_(True)
    if seq_adv:
        a = torch.tensor([adv[i][0] for i in rows], dtype=D)
    else:
        a = grid(adv)
    if name == "losses.entropy_bonus":
        logp = grid([[-v for v in row] for row in lp]).requires_grad_(True)  # entropies ≥ 0
        batch = make_batch(range(len(mask)), mask, extra={"policy_entropy": logp})
        return (batch,), logp
    batch = make_batch(range(len(mask)), mask, policy_logprobs=logp, logprobs=grid(old), ref_logprobs=grid(ref))
    return ((batch,) if name == "losses.kl" else (a, batch)), logp


@pytest.mark.parametrize("name, pad_params, perm_params", PROPERTY_CASES)
@PROPS
@given(data=token_batch(), fill=st.sampled_from(GARBAGE), agg=st.sampled_from(MODES))
def test_loss_properties(name, pad_params, perm_params, data, fill, agg):
    mask, lp, old, ref, adv, seq_adv = data
    extra = {} if name in FIXED_AGG else {"agg": agg}

    def value(params, **kw):
        inputs, logp = build(name, mask, lp, old, ref, adv, seq_adv=seq_adv, **kw)
        torch.manual_seed(0)
        loss = call(name, *inputs, **params, **extra)
        return loss, logp

    want, _ = value(pad_params, fill=0.0)
    got, logp = value(pad_params, fill=fill)
    assert torch.isfinite(got)
    assert got.item() == want.item()  # padding contributes nothing, whatever it holds
    got.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[torch.tensor(mask) == 0] == 0).all()
    # permuting the rows (responses) leaves the scalar unchanged
    base, _ = value(perm_params, fill=0.0)
    perm = list(reversed(range(len(mask))))
    permuted, _ = value(perm_params, fill=fill, rows=perm)
    assert torch.isfinite(permuted)
    close(permuted, base.item(), 1e-9 * max(1.0, abs(base.item())))


# --------------------------------------------------------------------------------------------
# the row-sum form: a sequence advantage stays a (B, 1) column, a few tokens' terms are added to
# their rows' sums, the per-token terms are built only when read
# --------------------------------------------------------------------------------------------

SEQ_ADV_LOSSES = ("losses.ppo_clip", "losses.gspo", "losses.sapo", "losses.gpg", "losses.cispo", "losses.clip_cov",
                  "losses.kl_cov", "losses.gmpo")


@pytest.mark.parametrize("name", SEQ_ADV_LOSSES)
@pytest.mark.parametrize("fill", [NAN, float("inf")])
def test_sequence_advantage_of_an_empty_row_does_not_leak(name, fill):
    adv, logp, old, _, mask = parity_batch(1)  # row 2 is empty
    bad = adv.clone()
    bad[2] = fill
    torch.manual_seed(0)
    want, want_grad = run(name, adv, logp, old, mask)
    torch.manual_seed(0)
    got, grad = run(name, bad, logp, old, mask)
    assert torch.isfinite(got) and got.item() == want.item()
    assert torch.isfinite(grad).all()
    close(grad, want_grad, 0.0)


def test_clip_cov_zero_advantage_tokens_are_candidates():
    # a token with A = 0 is never PPO-clipped (ℓ1 = ℓ2 = 0), whatever its ratio: verl keeps it a candidate
    adv, logp, old, mask = cov_batch(21, B=5, T=12)
    tok = adv[:, None] * (1 + 0.3 * torch.rand(5, 12, generator=torch.Generator().manual_seed(2), dtype=D)) * mask
    tok[:, ::3] = 0.0
    old = old - 0.5 * (torch.arange(12) % 3 == 0).to(D)  # ratio e^0.5 ≈ 1.65 there: beyond 1 + eps_high
    for agg in MODES:
        check_parity("losses.clip_cov",
                     lambda lp: ref_clip_cov(tok, lp, old, mask, 0.2, 0.2, 0.5, -100.0, 100.0, agg)[0],
                     tok, logp, old, mask, seed=3, agg=agg, cov_ratio=0.5, cov_lb=-100.0, cov_ub=100.0)


def test_gmpo_zero_advantage_token_with_zero_log_ratio_has_no_gradient():
    # Δ = 0 exactly on the A = 0 token: sign(A) · min(...) is 0 with gradient 0 (a clamp to [0, 0] alone
    # would pass the gradient at its bound)
    loss, grad = run("losses.gmpo", [[2.0, 0.0, 2.0]], [[0.1, -0.3, 0.1]], [[0.0, -0.3, 0.0]])
    rho = math.exp(0.2 / 3)
    close(loss, -(4 / 3) * rho, 1e-9)
    close(grad, [-(4 / 3) * rho / 3, 0.0, -(4 / 3) * rho / 3], 1e-9)


@pytest.mark.parametrize("name, params", [
    ("losses.ppo_clip", {}), ("losses.gspo", {}), ("losses.sapo", {}), ("losses.gpg", {}), ("losses.cispo", {}),
    ("losses.clip_cov", {"cov_ratio": 0.3, "cov_lb": -100.0, "cov_ub": 100.0}), ("losses.kl_cov", {"cov_ratio": 0.3}),
])
@pytest.mark.parametrize("token_adv", [False, True])
def test_terms_are_the_per_token_loss(name, params, token_adv):
    """``.terms`` (read by replay --objective) holds ℓm per token: its row sums give the loss under
    seq-mean-token-sum, a chosen Clip-Cov token is 0 there, a KL-Cov top token carries its penalty."""
    adv, logp, old, _, mask = parity_batch(3, B=6, T=10, token_adv=token_adv)
    extra = {} if name == "losses.gspo" else {"agg": "seq-mean-token-sum"}
    torch.manual_seed(0)
    loss = call(name, adv, make_batch(range(6), mask, policy_logprobs=logp, logprobs=old), **params, **extra)
    terms = loss.terms.detach()
    assert terms.shape == mask.shape and not terms.requires_grad
    assert (terms[mask == 0] == 0).all()
    rows = mask.sum(-1) > 0
    per_seq = terms.sum(-1) if extra else terms.sum(-1) / (mask.sum(-1) + 1e-8)
    close(per_seq[rows].mean(), loss.item(), 1e-12)
    if name == "losses.clip_cov":  # the tokens verl's procedure takes out (same seed) are exactly 0
        torch.manual_seed(0)
        _, corr = ref_clip_cov(adv, logp, old, mask, 0.2, 0.2, 0.3, -100.0, 100.0, "seq-mean-token-sum")
        chosen = (corr == 0) & (mask > 0)
        assert chosen.any() and (terms[chosen] == 0).all()
        a = adv_tokens(adv, mask)
        ratio = torch.exp(logp - old)
        want = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) * corr * mask
        close(terms, want, 1e-12)
