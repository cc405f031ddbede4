"""Worked-example, quirk, reference and property tests of the token-level shaping stages
(shapeflow/stdlib/shaping_tokens.py): UCAS (catalog-a §1), STEER (catalog-b §4), DCPO (catalog-b §5).

Expected numbers are the catalogs' worked examples (UCAS's and STEER's computed there with the
official functions; DCPO's from the transcribed trainer code), numbers worked out by hand next to
each case, or the straightforward references below: per-response / per-token Python loops in
float64, independent of the stages and of shapeflow's helpers.
"""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from conftest import call, make_batch, spec_trainer  # noqa: E402

from shapeflow.stdlib.needs import resolve_needs  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402
from shapeflow.stdlib.shaping_tokens import logprobs_at, steer_weights  # noqa: E402
from shapeflow.stdlib.state import StageState  # noqa: E402

PROPS = settings(derandomize=True, max_examples=40, deadline=None, database=None)
NAN = float("nan")


def close(got, want, rel=1e-5, abs_=1e-6):
    """Every entry within rel · max(1, |want|) (and abs_ for values near 0)."""
    got = torch.as_tensor(got, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(want, dtype=torch.float64).flatten().tolist()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= max(rel * max(1.0, abs(w)), abs_), (got, want)


def catalog(got, want, places=4):
    """A catalog number printed to ``places`` decimals."""
    close(got, want, rel=0, abs_=0.51 * 10.0 ** -places)


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def rows(out, lengths):
    """The valid prefix of each row, as lists."""
    return [out[i, :n].tolist() for i, n in enumerate(lengths)]


def prefix_mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


def state_for(name):
    return StageState(dict(default_registry()[name].state), owner=name)


def test_the_stages_are_registered_with_their_contracts():
    reg = default_registry()
    assert reg["ucas"].needs == {"self_certainty", "sampled_logit"} and str(reg["ucas"].output) == "Advantage[tok]"
    assert reg["losses.steer"].phase == "update"
    assert reg["losses.steer"].needs == {"logprobs", "policy_logprobs", "entropy"}
    assert reg["dcpo"].needs == {"logprobs", "logprobs@{t_high}", "logprobs@{t_low}"}
    assert set(dict(reg["dcpo"].state)) == {"entropy", "temperature", "alpha"}
    for name in ("ucas", "losses.steer", "dcpo"):
        assert "arXiv:" in reg[name].paper and "code" in reg[name].paper


# --------------------------------------------------------------------------------------------
# UCAS
# --------------------------------------------------------------------------------------------

UCAS_LENGTHS = [3, 4, 2, 4]
UCAS_MASK = prefix_mask(UCAS_LENGTHS, 4)
UCAS_CERTAINTY = t32([[2.0, 3.0, 2.5, 0.0], [4.0, 5.0, 4.5, 5.5], [1.0, 1.5, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
UCAS_LOGITS = t32([[20, 25, 18, 0], [30, 28, 35, 22], [15, 19, 0, 0], [26, 24, 27, 21]])
UCAS_REWARDS = t32([1, 0, 1, 0])


def ucas_batch(certainty=UCAS_CERTAINTY, logits=UCAS_LOGITS, mask=UCAS_MASK, group_index=(0, 0, 0, 0)):
    return make_batch(list(group_index), mask, extra={"self_certainty": certainty, "sampled_logit": logits})


def test_ucas_catalog_example():
    out = call("ucas", UCAS_REWARDS, ucas_batch())
    got = rows(out, UCAS_LENGTHS)
    catalog(got[0], [0.9428, 0.9303, 0.9478])
    catalog(got[1], [-1.3783, -1.3733, -1.3908, -1.3583])
    catalog(got[2], [1.1419, 1.1319])
    catalog(got[3], [-0.9726, -0.9676, -0.9751, -0.9601])
    assert out[UCAS_MASK == 0].eq(0).all()
    # with α = 0 the tokens carry Â = A · m (the table's last column), and Â / A the modifier
    shaped = call("ucas", UCAS_REWARDS, ucas_batch(), alpha=0.0)[:, 0]
    catalog(shaped, [0.9553, -1.3408, 1.1419, -0.9451])
    catalog(shaped / t32([0.8660, -0.8660, 0.8660, -0.8660]), [1.1031, 1.5483, 1.3186, 1.0914], places=3)


def test_ucas_certainty_sums_every_position_by_default():
    """The official code sums self-certainty over the padded row with no mask."""
    noisy = UCAS_CERTAINTY.clone()
    noisy[UCAS_MASK == 0] = 7.0  # values at padding positions (rows 0 and 2)
    clean = call("ucas", UCAS_REWARDS, ucas_batch())
    default = call("ucas", UCAS_REWARDS, ucas_batch(certainty=noisy))
    assert not torch.allclose(default, clean, atol=1e-3)  # padding changed C_0 and C_2
    # the same as a batch whose certainty sums include those values on the valid tokens
    c = noisy.sum(-1)
    moved = torch.zeros_like(noisy)
    moved[:, 0] = c
    close(default, call("ucas", UCAS_REWARDS, ucas_batch(certainty=moved)))
    noisy[UCAS_MASK == 0] = NAN
    valid_only = call("ucas", UCAS_REWARDS, ucas_batch(certainty=noisy), certainty_mask="valid")
    close(valid_only, clean)
    assert call("ucas", UCAS_REWARDS, ucas_batch(certainty=noisy)).isnan().any()  # the code's sum sees NaN


def test_ucas_certainty_mean_over_the_positions_summed():
    mean_valid = call("ucas", UCAS_REWARDS, ucas_batch(), certainty_mask="valid", certainty_agg="mean")
    c = [7.5 / 3, 19.0 / 4, 2.5 / 2, 12.0 / 4]
    close(mean_valid, ucas_reference([1, 0, 1, 0], [0] * 4, [[x] for x in c], rows(UCAS_LOGITS, UCAS_LENGTHS),
                                     UCAS_LENGTHS, T=4), rel=1e-5, abs_=1e-5)
    mean_all = call("ucas", UCAS_REWARDS, ucas_batch(), certainty_agg="mean")  # ÷ T = 4: the z-score is unchanged
    close(mean_all, call("ucas", UCAS_REWARDS, ucas_batch()), rel=1e-5, abs_=1e-5)


def test_ucas_all_equal_group_keeps_the_token_penalty_or_zero():
    rewards = t32([1, 1, 1, 1])
    out = call("ucas", rewards, ucas_batch())
    # A = 0 → Â = 0 → −α ℓ̃ on every token; ℓ̃ over the batch range 15…35
    want = [[-0.05 * (v - 15) / 20 for v in row] for row in rows(UCAS_LOGITS, UCAS_LENGTHS)]
    for g, w in zip(rows(out, UCAS_LENGTHS), want):
        close(g, w)
    assert call("ucas", rewards, ucas_batch(), flat_groups="zero").eq(0).all()


def test_ucas_one_response_group_uses_mean_zero_std_one():
    batch = make_batch([0], [[1.0, 1.0]], extra={"self_certainty": t32([[0.5, 1.5]]),
                                                 "sampled_logit": t32([[10.0, 30.0]])})
    out = call("ucas", t32([1.0]), batch)
    a = 1.0 / (1.0 + 1e-6)
    c_hat = 2.0 / (1.0 + 1e-6)  # the raw certainty sum
    shaped = a * math.exp(-0.25 * c_hat)
    close(out, [shaped - 0.0, shaped - 0.05 * 20 / (20 + 1e-6)])


def test_ucas_token_certainty_is_one_half_when_all_logits_are_equal():
    out = call("ucas", UCAS_REWARDS, ucas_batch(logits=torch.full((4, 4), 3.0)))
    shaped = call("ucas", UCAS_REWARDS, ucas_batch(), alpha=0.0)
    close(out[UCAS_MASK > 0], (shaped - 0.05 * 0.5)[UCAS_MASK > 0])


def test_ucas_token_certainty_is_batch_global():
    """Another group's logits move the min–max of this group's tokens."""
    mask = torch.cat([UCAS_MASK, torch.ones(2, 4)])
    certainty = torch.cat([UCAS_CERTAINTY, torch.ones(2, 4)])
    rewards = torch.cat([UCAS_REWARDS, t32([1, 0])])
    low = torch.cat([UCAS_LOGITS, torch.full((2, 4), 20.0)])
    high = torch.cat([UCAS_LOGITS, torch.full((2, 4), 55.0)])  # the batch max becomes 55
    a = call("ucas", rewards, ucas_batch(certainty, low, mask, (0, 0, 0, 0, 1, 1)))
    b = call("ucas", rewards, ucas_batch(certainty, high, mask, (0, 0, 0, 0, 1, 1)))
    close(a[:4], call("ucas", UCAS_REWARDS, ucas_batch()))  # 20 lies inside 15…35: nothing moves
    close(b[0, :3], (a[0, :3] + 0.05 * (t32([20, 25, 18]) - 15) / 20) - 0.05 * (t32([20, 25, 18]) - 15) / 40)


def test_ucas_positive_responses_are_clamped_at_zero():
    # α = 1: a correct response's token with ℓ̃ = 1 would go below 0 and is held at 0
    batch = ucas_batch(certainty=t32([[30, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
                       logits=t32([[35, 15, 15, 0], [15, 15, 15, 15], [15, 15, 0, 0], [15, 15, 15, 15]]))
    out = call("ucas", UCAS_REWARDS, batch, alpha=1.0)
    shaped = call("ucas", UCAS_REWARDS, batch, alpha=0.0)
    # C = [30, 0, 0, 0]: Ĉ_0 = 22.5/15 = 1.5, so Â_0 = 0.866 · exp(−0.375) = 0.5951 < α
    catalog(shaped[0, 0], 0.8660 * math.exp(-0.25 * 1.5 / (1 + 1e-6 / 15)), places=4)
    assert out[0, 0].item() == 0.0 and out[0, 1].item() == pytest.approx(shaped[0, 1].item())  # ℓ̃ = 1, then 0
    close(out[1], shaped[1])  # ℓ̃ = 0 on every token of the other rows
    assert (out[3] < 0).all() and (out[1] < 0).all()  # negative responses are never clamped
    below = call("ucas", t32([0, 1, 0, 1]), batch, alpha=1.0)  # row 0 is now negative: 1 · ℓ̃ goes through
    assert below[0, 0].item() == pytest.approx(call("ucas", t32([0, 1, 0, 1]), batch, alpha=0.0)[0, 0].item() - 1,
                                               abs=1e-5)


def test_ucas_dr_variant_drops_both_stds():
    out = call("ucas", UCAS_REWARDS, ucas_batch(), norm_by_std=False)
    want = ucas_reference([1, 0, 1, 0], [0] * 4, rows(UCAS_CERTAINTY, [4] * 4), rows(UCAS_LOGITS, UCAS_LENGTHS),
                          UCAS_LENGTHS, T=4, norm_by_std=False)
    close(out, want, rel=1e-5, abs_=1e-5)


def ucas_reference(rewards, group_index, certainty_rows, logit_rows, lengths, T, *, beta_pos=0.25, beta_neg=0.35,
                   alpha=0.05, eps=1e-6, norm_by_std=True, flat_zero=False):
    """UCAS per response, in float64: ``certainty_rows`` hold the values C_i sums (every position
    or only the valid ones, as the caller chooses); ``logit_rows`` the valid tokens' logits."""
    members: dict = {}
    for i, g in enumerate(group_index):
        members.setdefault(g, []).append(i)

    def zscore(values):
        out = [0.0] * len(values)
        for idx in members.values():
            xs = [values[i] for i in idx]
            if len(idx) == 1:
                mean, std = 0.0, 1.0
            elif len(set(xs)) == 1:
                continue  # exactly 0
            else:
                mean = sum(xs) / len(xs)
                std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
            for i in idx:
                out[i] = (values[i] - mean) / (std + eps) if norm_by_std else values[i] - mean
        return out

    adv = zscore([float(r) for r in rewards])
    c_hat = zscore([float(sum(row)) for row in certainty_rows])
    flat = {g for g, idx in members.items() if len(idx) > 1 and len({rewards[i] for i in idx}) == 1}
    tokens = [v for row in logit_rows for v in row]
    lo, hi = (min(tokens), max(tokens)) if tokens else (0.0, 0.0)
    out = [[0.0] * T for _ in rewards]
    for i, a in enumerate(adv):
        m = math.exp(-beta_pos * c_hat[i]) if a > 0 else math.exp(beta_neg * c_hat[i])
        shaped = a * m
        for t in range(lengths[i]):
            norm = (logit_rows[i][t] - lo) / (hi - lo + eps) if hi - lo > eps else 0.5
            raw = shaped - alpha * norm
            out[i][t] = max(raw, 0.0) if shaped > 0 else raw
            if flat_zero and group_index[i] in flat:
                out[i][t] = 0.0
    return out


@st.composite
def token_batch(draw, max_groups=4, max_size=5, max_T=5):
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    group_index = [g for g, n in enumerate(sizes) for _ in range(n)]
    random.Random(draw(st.integers(0, 2**16))).shuffle(group_index)  # groups interleaved in the batch
    B, T = len(group_index), draw(st.integers(1, max_T))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    rewards = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=B, max_size=B))
    grid = st.integers(-40, 40).map(lambda k: k / 4)  # exact in float32
    certainty = draw(st.lists(st.lists(grid.map(abs), min_size=T, max_size=T), min_size=B, max_size=B))
    logits = draw(st.lists(st.lists(grid, min_size=T, max_size=T), min_size=B, max_size=B))
    return group_index, lengths, rewards, certainty, logits, T


def with_padding(values, lengths, fill):
    out = torch.tensor(values, dtype=torch.float32)
    out[prefix_mask(lengths, out.shape[1]) == 0] = fill
    return out


@PROPS
@given(token_batch(), st.sampled_from(["all", "valid"]), st.booleans(), st.sampled_from(["penalty", "zero"]))
def test_ucas_matches_the_reference(data, certainty_mask, norm_by_std, flat_groups):
    group_index, lengths, rewards, certainty, logits, T = data
    mask = prefix_mask(lengths, T)
    fill = NAN if certainty_mask == "valid" else 0.0  # valid: padding may hold anything
    batch = ucas_batch(with_padding(certainty, lengths, fill) if certainty_mask == "valid" else t32(certainty),
                       with_padding(logits, lengths, NAN), mask, group_index)
    out = call("ucas", t32(rewards), batch, certainty_mask=certainty_mask, norm_by_std=norm_by_std,
               flat_groups=flat_groups)
    summed = certainty if certainty_mask == "all" else [row[:n] for row, n in zip(certainty, lengths)]
    want = ucas_reference(rewards, group_index, summed, [row[:n] for row, n in zip(logits, lengths)], lengths, T,
                          norm_by_std=norm_by_std, flat_zero=flat_groups == "zero")
    assert torch.isfinite(out).all() and out[mask == 0].eq(0).all()
    close(out, want, rel=2e-5, abs_=2e-5)


@PROPS
@given(token_batch(), st.integers(0, 2**16))
def test_ucas_permuting_responses_permutes_the_advantages(data, seed):
    group_index, lengths, rewards, certainty, logits, T = data
    perm = list(range(len(group_index)))
    random.Random(seed).shuffle(perm)
    mask = prefix_mask(lengths, T)
    out = call("ucas", t32(rewards), ucas_batch(t32(certainty), t32(logits), mask, group_index))
    p = torch.tensor(perm)
    permuted = call("ucas", t32(rewards)[p], ucas_batch(t32(certainty)[p], t32(logits)[p], mask[p],
                                                        [group_index[i] for i in perm]))
    close(permuted, out[p], rel=1e-5, abs_=1e-5)


def test_ucas_empty_batch():
    batch = make_batch([], torch.zeros(0, 3), extra={"self_certainty": torch.zeros(0, 3),
                                                     "sampled_logit": torch.zeros(0, 3)})
    assert call("ucas", torch.zeros(0), batch).shape == (0, 3)


# --------------------------------------------------------------------------------------------
# STEER
# --------------------------------------------------------------------------------------------

STEER_A = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, 0]], dtype=torch.float64)
STEER_P = torch.tensor([[0.9, 0.5, 0.2, 0.05], [0.9, 0.5, 0.2, 0.3]], dtype=torch.float64)
STEER_H = torch.tensor([[0.3, 1.2, 2.0, 2.5], [0.3, 1.2, 2.0, 1.0]], dtype=torch.float64)
STEER_MASK = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64)


def test_steer_weights_catalog_example():
    lp = STEER_P.log()
    exp = steer_weights(STEER_A, STEER_H, lp, lp, STEER_MASK)
    catalog(exp, [0.991, 0.887, 0.862, 0.800, 0.991, 0.887, 0.862, 0.0], places=3)
    assert exp[0, 3].item() == pytest.approx(0.8, abs=1e-12)  # the largest ω gets exactly λ_min
    linear = steer_weights(STEER_A, STEER_H, lp, lp, STEER_MASK, mapping="linear", weight_min=0.8, weight_max=1.2)
    catalog(linear, [1.2, 0.993, 0.940, 0.8, 1.2, 0.993, 0.940, 0.0], places=3)
    # |Ω| itself: exp(−k ω) = λ → ω = −ln λ / k
    k = -math.log(0.8) / 0.4709
    omega = -exp[:, :3].log() / k
    catalog(omega, [0.0195, 0.2534, 0.3124, 0.0195, 0.2534, 0.3124], places=3)


def test_steer_weights_edge_cases():
    lp = STEER_P.log()
    zero = torch.zeros_like(STEER_A)
    # every ω = 0: linear gives the midpoint, exp gives exp(0) = 1
    assert steer_weights(zero, STEER_H, lp, lp, STEER_MASK, mapping="linear", weight_min=0.8,
                         weight_max=1.3)[STEER_MASK > 0].eq(1.05).all()
    assert steer_weights(zero, STEER_H, lp, lp, STEER_MASK)[STEER_MASK > 0].eq(1.0).all()
    # ω_max below 0.02: k uses 0.02, so the largest ω's weight stays above λ_min
    small = steer_weights(STEER_A * 0.01, STEER_H, lp, lp, STEER_MASK)
    assert small[0, 3].item() == pytest.approx(math.exp(math.log(0.8) / 0.02 * 0.004709), abs=2e-4)
    # a non-finite Ω counts as 0 (the code's where(isfinite)); padding may hold NaN
    h = STEER_H.clone()
    h[0, 1] = math.inf
    h[1, 3] = NAN
    w = steer_weights(STEER_A, h, lp, lp, STEER_MASK)
    assert w[0, 1].item() == 1.0 and w[1, 3].item() == 0.0 and torch.isfinite(w).all()
    empty = steer_weights(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2))
    assert empty.shape == (0, 2)


def test_steer_loss_catalog_value_and_ppo_clip_identity():
    lp = STEER_P.log()
    batch = make_batch([0, 1], STEER_MASK, logprobs=lp, policy_logprobs=lp, entropy=STEER_H)
    loss = call("losses.steer", STEER_A, batch)
    w = steer_weights(STEER_A, STEER_H, lp, lp, STEER_MASK)
    assert loss.item() == pytest.approx(-(w[0].sum() - w[1, :3].sum()).item() / 7, abs=1e-12)
    catalog(loss, -0.1143)
    # the same as ppo_clip with the advantage λ·A
    same = call("losses.ppo_clip", STEER_A * w, batch)
    assert loss.item() == pytest.approx(same.item(), abs=1e-12)


def steer_reference(A, H, old, lp, mask, *, mapping, wmin, wmax, eps_low, eps_high, c, agg):
    """A straightforward per-token STEER loss: weights from Python floats, each token's dual-clip
    term with torch (for the gradient through ``lp``), then the aggregation."""
    valid = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t] > 0]
    omega = {}
    for i, t in valid:
        x = min(max(math.exp(lp[i, t].item()), 1e-8), 1 - 1e-8)
        p_old = min(max(math.exp(old[i, t].item()), 1e-8), 1.0)
        value = A[i, t].item() / p_old * x * (1 - x) * (math.log(x) + H[i, t].item())
        omega[i, t] = abs(value) if math.isfinite(value) else 0.0
    lo, hi = min(omega.values()), max(omega.values())
    terms = {}
    for i, t in valid:
        if mapping == "exp":
            k = -math.log(wmin) / max(hi, 0.02)
            w = min(max(math.exp(-k * omega[i, t]), wmin), 1.0)
        else:
            w = wmax - (omega[i, t] - lo) * (wmax - wmin) / (hi - lo) if hi > lo else (wmin + wmax) / 2
            w = min(max(w, wmin), wmax)
        a = A[i, t].item()
        ratio = torch.exp(torch.clamp(lp[i, t] - old[i, t], -20.0, 20.0))
        term = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
        if a < 0:
            term = torch.minimum(term, torch.tensor(-a * c, dtype=term.dtype))
        terms[i, t] = w * term
    if agg == "token-mean":
        return sum(terms.values()) / len(terms)
    per_row = [[terms[i, t] for t in range(mask.shape[1]) if (i, t) in terms] for i in range(mask.shape[0])]
    per_row = [r for r in per_row if r]
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / (len(r) + 1e-8) for r in per_row) / len(per_row)  # catalog B11: + 1e-8
    return sum(sum(r) for r in per_row) / len(per_row)  # seq-mean-token-sum


@pytest.mark.parametrize("mapping", ["exp", "linear"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steer_value_and_gradient_match_the_reference(mapping, agg, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    mask = (torch.rand(B, T, generator=gen) < 0.8).double()
    mask[:, 0] = 1.0
    A = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    new = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5  # ratios far enough to clip
    H = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old_pad, new_pad = old.masked_fill(mask == 0, NAN), new.masked_fill(mask == 0, math.inf)
    lp = new_pad.clone().requires_grad_(True)
    batch = make_batch(list(range(B)), mask, logprobs=old_pad, policy_logprobs=lp, entropy=H.masked_fill(mask == 0, NAN))
    params = dict(mapping=mapping, weight_min=0.8, weight_max=1.2, eps_low=0.2, eps_high=0.28, clip_c=3.0, agg=agg)
    loss = call("losses.steer", A, batch, **params)
    loss.backward()
    ref_lp = new.clone().requires_grad_(True)
    ref = steer_reference(A, H, old, ref_lp, mask, mapping=mapping, wmin=0.8, wmax=1.2, eps_low=0.2,
                          eps_high=0.28, c=3.0, agg=agg)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.isfinite(lp.grad).all() and lp.grad[mask == 0].eq(0).all()
    assert torch.allclose(lp.grad, ref_lp.grad, atol=1e-10, rtol=0)


def test_steer_sequence_advantage_broadcasts():
    lp = STEER_P.log()
    batch = make_batch([0, 1], STEER_MASK, logprobs=lp, policy_logprobs=lp, entropy=STEER_H)
    seq = call("losses.steer", torch.tensor([1.0, -1.0], dtype=torch.float64), batch)
    tok = call("losses.steer", torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64), batch)
    assert seq.item() == pytest.approx(tok.item(), abs=1e-12)


def test_steer_statistics_are_those_of_the_rows_given():
    """The code's micro-batch scope: the same token gets another weight in another micro-batch."""
    lp = STEER_P.log()
    batch = make_batch([0, 1], STEER_MASK, logprobs=lp, policy_logprobs=lp, entropy=STEER_H)
    row1 = batch.select(torch.tensor([1]))
    w_all = steer_weights(STEER_A, STEER_H, lp, lp, STEER_MASK)
    w_row = steer_weights(STEER_A[1:], STEER_H[1:], lp[1:], lp[1:], STEER_MASK[1:])
    assert w_row[0, 2].item() == pytest.approx(0.8) and w_all[1, 2].item() > 0.86  # ω_max is now row 1's
    loss = call("losses.steer", STEER_A[1:], row1)
    assert loss.item() == pytest.approx((w_row[0, :3].sum() / 3).item(), abs=1e-12)


def test_steer_parameters():
    ok = default_registry()["losses.steer"].params
    assert ok().stats_scope == "micro" and ok().mapping == "exp"
    assert ok(stats_scope="mini").stats_scope == "mini" and ok(stats_scope="global").stats_scope == "global"
    with pytest.raises(ValidationError, match="stats_scope"):
        ok(stats_scope="group")
    with pytest.raises(ValidationError, match="weight_min <= 1"):
        ok(weight_min=1.1)
    with pytest.raises(ValidationError, match="weight_min <= weight_max"):
        ok(mapping="linear", weight_min=1.3, weight_max=1.2)
    ok(mapping="linear", weight_min=0.9, weight_max=1.5)


@PROPS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16), st.sampled_from(["exp", "linear"]))
def test_steer_weights_stay_in_their_range(B, T, seed, mapping):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=gen) < 0.7).float()
    A = torch.randn(B, T, generator=gen)
    lp = -torch.rand(B, T, generator=gen) * 5
    w = steer_weights(A, torch.rand(B, T, generator=gen) * 4, lp, lp + 0.1, mask, mapping=mapping,
                      weight_min=0.7, weight_max=1.3)
    valid = w[mask > 0]
    top = 1.0 if mapping == "exp" else 1.3
    assert torch.isfinite(w).all() and w[mask == 0].eq(0).all()
    assert ((valid >= 0.7 - 1e-6) & (valid <= top + 1e-6)).all()
    # the statistics cover the rows given, whatever their order: permuting rows permutes the weights
    perm = torch.randperm(B, generator=gen)
    h = torch.rand(B, T, generator=gen) * 4
    w = steer_weights(A, h, lp, lp + 0.1, mask, mapping=mapping, weight_min=0.7, weight_max=1.3)
    wp = steer_weights(A[perm], h[perm], lp[perm], lp[perm] + 0.1, mask[perm], mapping=mapping, weight_min=0.7,
                       weight_max=1.3)
    close(wp, w[perm], rel=1e-6, abs_=1e-6)


# --------------------------------------------------------------------------------------------
# DCPO
# --------------------------------------------------------------------------------------------


def dcpo_batch(logprobs, at, mask=None, group_index=(0, 0, 0, 0)):
    extra = {name: value for name, value in at.items()}
    return make_batch(list(group_index), mask if mask is not None else torch.ones(len(group_index), logprobs.shape[1]),
                      logprobs=logprobs, extra=extra)


def test_dcpo_catalog_example():
    rho = torch.tensor([0.917, 0.944, 1.1], dtype=torch.float64)
    lp = torch.full((4, 3), -1.0, dtype=torch.float64)
    at = {"logprobs@1.2": (rho.log() - 1.0).expand(4, 3).clone(), "logprobs@0.8": torch.full((4, 3), NAN)}
    state = state_for("dcpo")
    state["entropy"] = 0.30
    out = call("dcpo", t32([1, 0, 0, 1]), dcpo_batch(lp, at), state=state)
    assert state["alpha"] == pytest.approx(0.2 / 1.2) and state["temperature"] == 1.2
    catalog(state["alpha"], 0.1667)
    # the catalog's products were worked from 0.833 and 0.1667: within 1e-3
    close(out[0], [0.874, 0.879, 0.905], rel=0, abs_=1e-3)
    catalog(out[1], [-0.722] * 3, places=3)
    a = 0.5 / math.sqrt(1 / 3) / (1 + 1e-6 / math.sqrt(1 / 3))  # 0.866025 (verl: 0.5 / (std + 1e-6))
    close(out[3], [(1 - 1 / 6) * a + (1 / 6) * r for r in rho.tolist()])
    assert state["entropy"] == pytest.approx(1.0)  # this batch's NLL, for the next step


def test_dcpo_state_carries_the_nll_across_steps():
    """Step 1 (H_prev = 0 ≤ H_0): T = 1.2, α' = min(0.5, 0.1)/p̂; its NLL 0.9 > H_0 makes step 2 use T = 0.8."""
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    lp1 = torch.tensor([[-0.5, -1.0, NAN], [-0.7, -1.2, -0.9], [-1.1, 0, 0], [-0.8, -0.9, -0.8]])
    nll = -(lp1.nan_to_num() * mask).sum().item() / 9  # 0.877...
    at1 = {"logprobs@1.2": lp1 - 0.1, "logprobs@0.8": torch.full((4, 3), NAN)}
    state = state_for("dcpo")
    r = t32([1, 0, 0, 0])  # p̂ = 1/4
    out1 = call("dcpo", r, dcpo_batch(lp1, at1, mask), state=state)
    alpha1 = 0.4 / 1.4  # α' = 0.1 / 0.25
    assert state["temperature"] == 1.2 and state["alpha"] == pytest.approx(alpha1)
    assert state["entropy"] == pytest.approx(nll, rel=1e-6) and nll > 0.5
    a = t32([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)  # GRPO: μ = 0.25, σ = 0.5
    close(out1[0, :2], [(1 - alpha1) * a[0].item() + alpha1 * math.exp(-0.1)] * 2)
    close(out1[1], [(1 - alpha1) * a[1].item()] * 3)
    assert out1[mask == 0].eq(0).all()
    # step 2: H_prev = 0.877 > 0.5 → T = 0.8 (logprobs@0.8 read, @1.2 never), α' = min(0.377, 0.1)/p̂
    lp2 = torch.full((4, 3), -0.2)
    at2 = {"logprobs@1.2": torch.full((4, 3), NAN), "logprobs@0.8": torch.full((4, 3), -0.1)}
    out2 = call("dcpo", t32([1, 1, 0, 0]), dcpo_batch(lp2, at2, mask), state=state)  # p̂ = 1/2
    alpha2 = 0.2 / 1.2
    assert state["temperature"] == 0.8 and state["alpha"] == pytest.approx(alpha2)
    assert state["entropy"] == pytest.approx(0.2, rel=1e-6)
    a2 = 0.5 / math.sqrt(1 / 3) / (1 + 1e-6 / math.sqrt(1 / 3))
    close(out2[0, :2], [(1 - alpha2) * a2 + alpha2 * math.exp(0.1)] * 2)
    close(out2[3], [-(1 - alpha2) * a2] * 3)
    assert torch.isfinite(out2).all()


def test_dcpo_guards_and_boundaries():
    lp = torch.full((4, 2), -1.0)
    at = {"logprobs@1.2": torch.full((4, 2), -0.5), "logprobs@0.8": torch.full((4, 2), -2.0)}
    # no correct response: the code's α is NaN (division by p̂ = 0); here α = 0 and Ã = A (all 0 here)
    state = state_for("dcpo")
    out = call("dcpo", t32([0, 0, 0, 0.05]), dcpo_batch(lp, at), state=state)  # 0.05 is not above 0.05
    assert state["alpha"] == 0.0 and torch.isfinite(out).all()
    grpo = call("grpo", t32([0, 0, 0, 0.05]), dcpo_batch(lp, at))
    close(out, grpo[:, None].expand(4, 2))
    # H_prev = H_0: T = t_high, and α = 0 (no gap)
    state["entropy"] = 0.5
    out = call("dcpo", t32([1, 0, 0, 1]), dcpo_batch(lp, at), state=state)
    assert state["temperature"] == 1.2 and state["alpha"] == 0.0
    close(out, call("grpo", t32([1, 0, 0, 1]), dcpo_batch(lp, at))[:, None].expand(4, 2))
    # the first step: H_prev = 0 (fresh state)
    state = state_for("dcpo")
    call("dcpo", t32([1, 0, 0, 1]), dcpo_batch(lp, at), state=state, entropy_base=0.05)
    assert state["temperature"] == 1.2 and state["alpha"] == pytest.approx(0.1 / 1.1)  # min(0.05, 0.1)/0.5


def test_dcpo_needs_resolve_to_both_temperatures():
    st_ = default_registry()["dcpo"]
    params = st_.params().model_dump()
    assert resolve_needs(st_.needs, params) == {"logprobs", "logprobs@1.2", "logprobs@0.8"}
    assert resolve_needs(st_.needs, {**params, "t_high": 1.5, "t_low": 1.0}) == {"logprobs", "logprobs@1.5",
                                                                                   "logprobs@1"}
    assert logprobs_at(1.0) == "logprobs@1" and logprobs_at(1.2) == "logprobs@1.2"


@PROPS
@given(token_batch(), st.floats(0.0, 2.0), st.integers(0, 2**16))
def test_dcpo_properties(data, h_prev, seed):
    group_index, lengths, rewards, _, _, T = data
    gen = torch.Generator().manual_seed(seed)
    B = len(group_index)
    mask = prefix_mask(lengths, T)
    lp = -torch.rand(B, T, generator=gen) * 3
    at = {"logprobs@1.2": lp * 0.8, "logprobs@0.8": lp * 1.25}
    padded = {k: v.masked_fill(mask == 0, NAN) for k, v in at.items()}
    state = state_for("dcpo")
    state["entropy"] = h_prev
    out = call("dcpo", t32(rewards), dcpo_batch(lp.masked_fill(mask == 0, math.inf), padded, mask, group_index),
               state=state)
    assert torch.isfinite(out).all() and out[mask == 0].eq(0).all()
    assert 0.0 <= state["alpha"] < 1.0
    # reference, in float64
    T_ = 1.2 if h_prev <= 0.5 else 0.8
    b = [1.0 if r > 0.05 else 0.0 for r in rewards]
    p_hat = sum(b) / B
    gap = min(abs(0.5 - h_prev), 0.1)
    alpha = (gap / p_hat) / (1 + gap / p_hat) if p_hat > 0 else 0.0
    adv = call("grpo", t32(rewards), make_batch(group_index, mask))
    name = logprobs_at(T_)
    want = [[((1 - alpha) * adv[i].item() + alpha * b[i] * math.exp(at[name][i, t].item() - lp[i, t].item()))
             if t < lengths[i] else 0.0 for t in range(T)] for i in range(B)]
    close(out, want, rel=1e-5, abs_=1e-6)
    # permuting the responses permutes the advantages (and leaves the state's numbers)
    perm = torch.randperm(B, generator=gen)
    state2 = state_for("dcpo")
    state2["entropy"] = h_prev
    permuted = call("dcpo", t32(rewards)[perm],
                    dcpo_batch(lp[perm], {k: v[perm] for k, v in at.items()}, mask[perm],
                               [group_index[i] for i in perm.tolist()]), state=state2)
    close(permuted, out[perm], rel=1e-5, abs_=1e-6)
    assert state2["alpha"] == pytest.approx(state["alpha"]) and state2["entropy"] == pytest.approx(state["entropy"],
                                                                                                   rel=1e-5, abs=1e-7)


def test_dcpo_in_a_training_run_keeps_the_nll_of_the_step_it_saw():
    """specs/dcpo.shape for two steps: the behaviour pass computes logprobs@1.2 and @0.8, and the
    stage's state holds −masked_mean of the last batch's behaviour log-probs."""
    trainer = spec_trainer("dcpo.shape", "train.prompts_per_step=4", "train.eval_size=8")
    assert {"logprobs@1.2", "logprobs@0.8"} <= set(trainer.program.needs)
    first = trainer.train_step(0)
    assert first["state/adv/temperature"] == 1.2  # H_prev = 0 at the first step
    batch = trainer.last_batch
    assert {"logprobs@1.2", "logprobs@0.8"} <= set(batch.extra)
    nll = -(batch.logprobs * batch.mask).sum().item() / batch.mask.sum().item()
    assert first["state/adv/entropy"] == pytest.approx(nll, rel=1e-5)
    second = trainer.train_step(1)
    assert second["state/adv/temperature"] == (1.2 if nll <= 0.5 else 0.8)
    assert all(math.isfinite(v) for v in second.values())


# --- STEER's statistics scope in the update loop ----------------------------------------------

def steer_trainer(*sets: str):
    return spec_trainer("steer.shape", "train.prompts_per_step=4", "group_size=4", "train.eval_size=8", "train.lr=1e-3",
                        *sets)


def _gradient_of_one_step(*sets: str):
    """The gradient of the first optimizer step and the step's metrics."""
    trainer = steer_trainer(*sets)
    grads = []
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    metrics = trainer.train_step(0)
    return grads[0], metrics


def test_steer_minibatch_scope_spans_the_micro_batches():
    """stats_scope = mini over 4 micro-batches gives the gradient of one micro-batch holding the
    whole minibatch; micro over 4 micro-batches does not (the weights' range changes)."""
    whole, _ = _gradient_of_one_step("train.grad_accum=1")
    mini, metrics = _gradient_of_one_step("train.grad_accum=4", "loss.stats_scope=mini")
    micro, _ = _gradient_of_one_step("train.grad_accum=4")
    scale = whole.abs().max().item()
    assert (mini - whole).abs().max().item() < 1e-5 * scale
    assert (micro - whole).abs().max().item() > 1e-3 * scale
    assert math.isfinite(metrics["objective/loss"])


def test_steer_global_scope_takes_the_range_over_the_whole_batch_under_the_current_weights(monkeypatch):
    """With two minibatches, the global scope's ω_min / ω_max before each minibatch are those of
    the whole batch under the weights of that moment (the second after one optimizer step)."""
    from shapeflow.runtime.engine import token_logprobs
    from shapeflow.runtime.trainer import Trainer

    trainer = steer_trainer("train.minibatches=2", "train.grad_accum=2", "loss.stats_scope=global")
    assert trainer.stats_scope == "global"
    seen, expected = [], []
    original = Trainer._scope_statistics

    def spy(self, batch, minibatches, rollout_values, epoch, scope):
        assert sorted(torch.cat([r for m in minibatches for r in m]).tolist()) == list(range(batch.size))
        with torch.no_grad():
            current = token_logprobs(self.model, batch.prompt_tokens, batch.prompt_mask, batch.response_ids,
                                     batch.mask, temperature=1.0).logprobs
            adv = rollout_values["adv"]
            x = current.exp().clamp(1e-8, 1 - 1e-8)
            old = batch.logprobs.exp().clamp(1e-8, 1.0)
            omega = (adv[:, None] / old * x * (1 - x) * (x.log() + batch.entropy)).abs()
            valid = batch.mask > 0
            expected.append((omega[valid].min().item(), omega[valid].max().item()))
        stats = original(self, batch, minibatches, rollout_values, epoch, scope)
        seen.append((stats.keys, [v.item() for v in stats.values]))
        return stats

    monkeypatch.setattr(Trainer, "_scope_statistics", spy)
    trainer.train_step(0)
    assert len(seen) == 2 and expected[0] != expected[1]  # one per minibatch; the weights moved between
    for (keys, values), (lo, hi) in zip(seen, expected):
        assert keys == ["steer.omega_min", "steer.omega_max"]
        assert values == pytest.approx([lo, hi], rel=1e-4, abs=1e-7)


def test_ucas_spec_pads_to_the_length_limit_and_sums_self_certainty_over_every_position():
    """verl pads every response to max_response_length and UCAS sums the self-certainty over all
    of those positions: specs/ucas.shape pads to max_new_tokens, and the behaviour pass computes
    the self-certainty at every one of them (padding included), as one full forward does."""
    import copy

    trainer = spec_trainer("ucas.shape", "train.prompts_per_step=4", "group_size=4", "train.eval_size=8")

    behaviour = copy.deepcopy(trainer.policy.model)  # the weights that sampled the batch
    trainer.train_step(0)
    batch = trainer.last_batch
    assert batch.mask.shape[1] == 5 and batch.extra["self_certainty"].shape == (16, 5)
    assert bool((batch.mask.sum(-1) < 5).any())  # some responses end early: padding is summed
    P = batch.prompt_tokens.shape[1]
    attention = torch.cat([batch.prompt_mask, batch.mask.to(batch.prompt_mask.dtype)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = behaviour(input_ids=torch.cat([batch.prompt_tokens, batch.response_ids], dim=1),
                                      attention_mask=attention, position_ids=positions).logits[:, P - 1:-1]
    z = logits.float()  # temperature 1
    expected = torch.logsumexp(z, -1) - z.mean(-1)
    assert torch.allclose(batch.extra["self_certainty"], expected, atol=1e-4, rtol=1e-5)
