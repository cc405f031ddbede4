"""Worked-example and property tests of the advantage estimators (catalog B §2: B1 with NeMo-RL's
leave-one-out baseline and GDPO, B4 RLOO, B5 REINFORCE++ and its baseline, B7 OPO, B8 GPG, B9
pass@k; MaxRL from its official code).

Expected numbers are worked out by hand (written next to each case) or come from the
straightforward per-group / per-token Python references below, in float64 (fractions where a
count of non-zero values matters), independent of the stages and of shapeflow's helpers.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import call, make_batch, stage_page_shows  # noqa: E402

PROPS = settings(derandomize=True, max_examples=60, deadline=None, database=None)
NAN = float("nan")

# catalog B1 batch: g0, g1, g2 in order
B1_REWARDS = [1, 0, 0, 1, 1, 1, 1, 1, 0.2, 0.9, 0, 0.5]
B1_GROUPS = [0] * 4 + [1] * 4 + [2] * 4
SEQ_STAGES = ("grpo", "rloo", "opo", "gpg", "grpo_passk", "maxrl", "group_normalize")


def close(got, want, rel=1e-5, abs_=1e-6):
    """Every entry within rel · max(1, |want|) (and abs_ for values near 0)."""
    got = torch.as_tensor(got, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(want, dtype=torch.float64).flatten().tolist()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= max(rel * max(1.0, abs(w)), abs_), (got, want)


def run(name, rewards, groups, mask=None, **params):
    batch = make_batch(groups, mask)
    r = rewards if torch.is_tensor(rewards) else torch.tensor(rewards, dtype=torch.float32)
    return call(name, r, batch, **params)


def members(groups):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def is_flat(values):
    return len(values) > 1 and len(set(values)) == 1


# --------------------------------------------------------------------------------------------
# independent references (per-group / per-token Python loops, float64)
# --------------------------------------------------------------------------------------------


def ref_grpo(rewards, groups, *, norm_by_std=True, eps=1e-6, std="sample", scope="group", baseline="mean"):
    stdev = statistics.stdev if std == "sample" else statistics.pstdev
    min_n = 2 if std == "sample" else 1
    batch_sigma = stdev(rewards) if len(rewards) > 1 else 1.0
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        rs = [rewards[i] for i in idx]
        for i in idx:
            if is_flat(rs):
                continue  # exactly 0
            if baseline == "mean":
                if len(idx) == 1:
                    b, sigma = 0.0, 1.0
                else:
                    b = sum(rs) / len(rs)
                    sigma = stdev(rs) if scope == "group" else batch_sigma
                out[i] = (rewards[i] - b) / (sigma + eps) if norm_by_std else rewards[i] - b
            else:  # NeMo-RL leave-one-out: the others' mean and std; divide only where std > 0
                if len(idx) == 1:
                    continue  # baseline = own reward
                others = [rewards[j] for j in idx if j != i]
                b = sum(others) / len(others)
                if scope == "batch":
                    sigma = batch_sigma
                elif len(others) >= min_n and len(set(others)) > 1:
                    sigma = stdev(others)
                else:
                    sigma = 0.0
                d = rewards[i] - b
                out[i] = d / (sigma + eps) if norm_by_std and sigma > 0 else d
    return out


def ref_rloo(rewards, groups, *, singleton="keep"):
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        for i in idx:
            if len(idx) == 1:
                out[i] = rewards[i] if singleton == "keep" else 0.0
            else:
                others = [rewards[j] for j in idx if j != i]
                out[i] = rewards[i] - sum(others) / len(others)
    return out


def ref_opo(rewards, groups, lengths):
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        rs = [rewards[i] for i in idx]
        den = sum(lengths[i] for i in idx)
        b = 0.0 if len(idx) == 1 or den == 0 else sum(lengths[i] * rewards[i] for i in idx) / den
        for i in idx:
            out[i] = 0.0 if is_flat(rs) else rewards[i] - b
    return out


def ref_gpg(rewards, groups, *, f_norm=1.0, alpha="nonzero_reward"):
    centred = [Fraction(0)] * len(rewards)
    for idx in members(groups).values():
        rs = [Fraction(rewards[i]) for i in idx]
        mu = Fraction(0) if len(idx) == 1 else sum(rs) / len(rs)
        for i in idx:
            centred[i] = Fraction(rewards[i]) - mu
    if alpha == "none":
        a = 1.0
    else:
        counted = [r != 0 for r in rewards] if alpha == "nonzero_reward" else [c != 0 for c in centred]
        a = len(rewards) / max(1, sum(counted))
    return [a * float(c) / f_norm for c in centred]


def ref_passk(rewards, groups, *, norm_by_std=True, eps=1e-6, std="sample"):
    stdev = statistics.stdev if std == "sample" else statistics.pstdev
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        rs = [rewards[i] for i in idx]
        top = sorted(rs, reverse=True)
        gap = top[0] - top[1]
        star = idx[rs.index(top[0])]
        out[star] = gap / (stdev(rs) + eps) if norm_by_std and gap != 0 else gap
    return out


def ref_maxrl(rewards, groups, *, eps=1e-6, singleton="mean_zero"):
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        rs = [rewards[i] for i in idx]
        for i in idx:
            if len(idx) == 1:
                out[i] = rewards[i] / eps if singleton == "mean_zero" else 0.0
            elif not is_flat(rs):
                mu = sum(rs) / len(rs)
                out[i] = (rewards[i] - mu) / (mu + eps)
    return out


def ref_whiten(rows, mask, *, eps, std="sample", eps_at="var"):
    """Whiten every valid entry of ``rows`` (list of lists) over all valid entries."""
    vals = [v for row, mrow in zip(rows, mask) for v, m in zip(row, mrow) if m]
    out = [[0.0] * len(row) for row in rows]
    if len(vals) < 2 or len(set(vals)) == 1:
        return out
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - (1 if std == "sample" else 0))
    scale = 1 / math.sqrt(var + eps) if eps_at == "var" else 1 / (math.sqrt(var) + eps)
    for i, (row, mrow) in enumerate(zip(rows, mask)):
        for t, (v, m) in enumerate(zip(row, mrow)):
            if m:
                out[i][t] = (v - mu) * scale
    return out


def ref_reinforce_pp(rewards, mask, *, gamma=1.0, eps=1e-8, std="sample"):
    """verl's loop, row by row: G_t = r_t + γ·G_{t+1}, reset after a position outside the mask."""
    returns = []
    for i, mrow in enumerate(mask):
        if isinstance(rewards[i], (list, tuple)):
            tok = [r if m else 0.0 for r, m in zip(rewards[i], mrow)]
        else:
            tok = [0.0] * len(mrow)
            valid = [t for t, m in enumerate(mrow) if m]
            if valid:
                tok[valid[-1]] = rewards[i]
        g, running = [0.0] * len(mrow), 0.0
        for t in reversed(range(len(mrow))):
            running = tok[t] + gamma * running
            g[t] = running
            running *= mrow[t]
        returns.append(g)
    return ref_whiten(returns, mask, eps=eps, std=std)


def ref_reinforce_pp_baseline(rewards, groups, mask, *, eps=1e-8, std="sample"):
    seq = [sum(r for r, m in zip(rewards[i], mrow) if m) if isinstance(rewards[i], (list, tuple)) else rewards[i]
           for i, mrow in enumerate(mask)]
    centred = [0.0] * len(seq)
    for idx in members(groups).values():
        rs = [seq[i] for i in idx]
        mu = 0.0 if len(idx) == 1 else sum(rs) / len(rs)
        for i in idx:
            centred[i] = 0.0 if is_flat(rs) else seq[i] - mu
    return ref_whiten([[c] * len(mrow) for c, mrow in zip(centred, mask)], mask, eps=eps, std=std)


# --------------------------------------------------------------------------------------------
# grpo: leave-one-out baseline (NeMo-RL) and TRL's batch scope
# --------------------------------------------------------------------------------------------


def test_grpo_loo_worked_examples():
    adv = run("grpo", B1_REWARDS, B1_GROUPS, baseline="leave_one_out")
    # g0 [1, 0, 0, 1], response 1: others [0, 0, 1], b = 1/3, σ = sample std = sqrt(1/3); A = (2/3)/σ
    s = math.sqrt(1 / 3)
    close(adv[:4], [(2 / 3) / (s + 1e-6), -(2 / 3) / (s + 1e-6), -(2 / 3) / (s + 1e-6), (2 / 3) / (s + 1e-6)])
    close(adv[0], 1.1547, rel=1e-4)
    assert adv[4:8].tolist() == [0.0] * 4  # g1 all equal
    # g2 [0.2, 0.9, 0, 0.5], response 1: others [0.9, 0, 0.5], b = 1.4/3, σ = sqrt(0.40667/2)
    b0, s0 = 1.4 / 3, math.sqrt(((0.9 - 1.4 / 3) ** 2 + (1.4 / 3) ** 2 + (0.5 - 1.4 / 3) ** 2) / 2)
    close(adv[8], (0.2 - b0) / (s0 + 1e-6))
    close(adv[8:], [-0.59138, 2.64905, -1.51865, 0.28214], rel=1e-4)
    close(adv, ref_grpo(B1_REWARDS, B1_GROUPS, baseline="leave_one_out"))


def test_grpo_loo_undivided_where_the_others_are_equal():
    # [1, 0, 0, 0]: response 1's others are all 0 → σ = 0 → A = 1 − 0, undivided (NeMo-RL's std > 0 rule)
    adv = run("grpo", [1, 0, 0, 0], [0] * 4, baseline="leave_one_out")
    s = math.sqrt(1 / 3)  # others [1, 0, 0] of responses 2-4
    close(adv, [1.0, -(1 / 3) / (s + 1e-6), -(1 / 3) / (s + 1e-6), -(1 / 3) / (s + 1e-6)])
    # a group of two: one other, no std → r − r_other
    close(run("grpo", [0.75, 0.25], [0, 0], baseline="leave_one_out"), [0.5, -0.5])
    # population std over the others: [1, 0, 0] → pstdev = sqrt(2/9)
    p = math.sqrt(2 / 9)
    close(run("grpo", [1, 0, 0, 0], [0] * 4, baseline="leave_one_out", std="population"),
          [1.0] + [-(1 / 3) / (p + 1e-6)] * 3)
    close(run("grpo", [0.75, 0.25], [0, 0], baseline="leave_one_out", std="population"), [0.5, -0.5])
    # singleton: baseline = own reward → 0
    assert run("grpo", [0.7, 1, 0], [0, 1, 1], baseline="leave_one_out")[0].item() == 0.0
    # no std: r − mean(others) = RLOO
    close(run("grpo", B1_REWARDS, B1_GROUPS, baseline="leave_one_out", norm_by_std=False),
          ref_rloo(B1_REWARDS, B1_GROUPS))


def test_grpo_loo_batch_scope():
    adv = run("grpo", B1_REWARDS, B1_GROUPS, baseline="leave_one_out", scope="batch")
    sigma = statistics.stdev(B1_REWARDS)  # 0.455937
    close(adv[8:], [d * 4 / 3 / (sigma + 1e-6) for d in (-0.2, 0.5, -0.4, 0.1)])
    close(adv, ref_grpo(B1_REWARDS, B1_GROUPS, baseline="leave_one_out", scope="batch"))


def test_grpo_batch_scope_is_trl_scale_rewards_batch():
    # TRL: advantages = (r − mean_grouped) / (rewards.std() + 1e-4), the std over the whole batch
    r = torch.tensor(B1_REWARDS, dtype=torch.float64)
    mean_grouped = r.view(-1, 4).mean(dim=1).repeat_interleave(4)
    trl = (r - mean_grouped) / (r.std() + 1e-4)
    close(run("grpo", B1_REWARDS, B1_GROUPS, scope="batch", eps=1e-4), trl)


def test_grpo_default_is_unchanged_by_the_new_parameter():
    close(run("grpo", B1_REWARDS, B1_GROUPS), ref_grpo(B1_REWARDS, B1_GROUPS))
    assert run("grpo", B1_REWARDS, B1_GROUPS).tolist() == run("grpo", B1_REWARDS, B1_GROUPS, baseline="mean").tolist()


# --------------------------------------------------------------------------------------------
# rloo, opo, gpg, grpo_passk, maxrl
# --------------------------------------------------------------------------------------------


def test_rloo_catalog_example():
    adv = run("rloo", B1_REWARDS, B1_GROUPS)
    close(adv[8:], [-0.267, 0.667, -0.533, 0.133], rel=1e-3)
    close(adv[8:], [-0.8 / 3, 2 / 3, -1.6 / 3, 0.4 / 3])  # 4/3 · (r − 0.4)
    close(adv[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert adv[4:8].tolist() == [0.0] * 4
    close(adv, ref_rloo(B1_REWARDS, B1_GROUPS))
    # singleton: verl keeps r; NeMo-RL gives 0
    assert run("rloo", [0.7, 1, 0], [0, 1, 1])[0].item() == pytest.approx(0.7)
    assert run("rloo", [0.7, 1, 0], [0, 1, 1], singleton="zero")[0].item() == 0.0


def test_opo_catalog_example():
    mask = [[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6]
    adv = run("opo", [1, 0, 0, 1], [0] * 4, mask)
    # b = (6 + 6)/(6 + 5 + 4 + 6) = 12/21
    close(adv, [1 - 12 / 21, -12 / 21, -12 / 21, 1 - 12 / 21])
    close(adv, [0.429, -0.571, -0.571, 0.429], rel=1e-3)
    close(adv, ref_opo([1, 0, 0, 1], [0] * 4, [6, 5, 4, 6]))
    # all-equal group exactly 0, singleton keeps r, an all-empty group has b = 0
    adv = run("opo", [0.9, 0.9, 0.7, 0.5, 0.25], [0, 0, 1, 2, 2], [[1, 1], [1, 0], [1, 1], [0, 0], [0, 0]])
    assert adv[:2].tolist() == [0.0, 0.0]
    close(adv[2:], [0.7, 0.5, 0.25])


def test_gpg_catalog_alpha():
    adv = run("gpg", B1_REWARDS, B1_GROUPS)
    # nine non-zero rewards of twelve: α = 12/9
    alpha = 12 / 9
    close(adv, [alpha * d for d in (0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.2, 0.5, -0.4, 0.1)])
    close(adv, ref_gpg(B1_REWARDS, B1_GROUPS))
    # the paper's reading: eight responses with a non-zero advantage (g1 is all equal) → α = 12/8
    close(run("gpg", B1_REWARDS, B1_GROUPS, alpha="nonzero_advantage"),
          [1.5 * d for d in (0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.2, 0.5, -0.4, 0.1)])
    close(run("gpg", B1_REWARDS, B1_GROUPS, alpha="none", f_norm=2.0),
          [d / 2 for d in (0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.2, 0.5, -0.4, 0.1)])
    # all rewards zero: α = B / max(1, 0) and every advantage 0
    assert run("gpg", [0, 0, 0], [0, 0, 1]).tolist() == [0.0, 0.0, 0.0]
    # singleton: μ = 0 → α·r; here one non-zero reward of three → α = 3
    close(run("gpg", [0.5, 0, 0], [0, 1, 1]), [1.5, 0, 0])


def test_grpo_passk_worked_example():
    adv = run("grpo_passk", B1_REWARDS, B1_GROUPS)
    # g0: tie for first (1, 1) → 0; g1 all equal → 0; g2: 0.9 leads 0.5 by 0.4, σ = 0.391578
    s = statistics.stdev([0.2, 0.9, 0, 0.5])
    close(adv, [0] * 9 + [0.4 / (s + 1e-6), 0, 0])
    close(adv[9], 1.0215, rel=1e-4)
    close(run("grpo_passk", B1_REWARDS, B1_GROUPS, norm_by_std=False), [0] * 9 + [0.4, 0, 0])
    close(adv, ref_passk(B1_REWARDS, B1_GROUPS))
    # with eps = 0 an all-equal group is 0, not 0/0
    adv = run("grpo_passk", [1, 1, 0, 1], [0, 0, 1, 1], eps=0.0)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    close(adv[3], 1 / math.sqrt(0.5))  # gap 1, σ of [0, 1] = sqrt(1/2)


def test_grpo_passk_singleton_is_an_error():
    with pytest.raises(ValueError, match=r"at least 2 responses per group; group 1 has 1"):
        run("grpo_passk", [1, 0, 1], [0, 0, 1])


def test_maxrl_worked_examples():
    adv = run("maxrl", [1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0], [0] * 4 + [1] * 4 + [2, 2] + [3, 3, 3, 3])
    # pass rate 1/4: (1 − 1/4)/(1/4 + eps) ≈ 3, (0 − 1/4)/(1/4 + eps) ≈ −1
    close(adv[:4], [0.75 / (0.25 + 1e-6)] + [-0.25 / (0.25 + 1e-6)] * 3)
    close(adv[:4], [3, -1, -1, -1], rel=1e-4)
    close(adv[4:8], [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)])
    assert adv[8:].tolist() == [0.0] * 6  # all correct, all wrong
    close(run("maxrl", B1_REWARDS, B1_GROUPS), ref_maxrl(B1_REWARDS, B1_GROUPS))
    # singleton: the official code's μ = 0 → r/eps; or 0
    close(run("maxrl", [1.0, 1, 0], [0, 1, 1])[0], 1e6)
    assert run("maxrl", [1.0, 1, 0], [0, 1, 1], singleton="zero")[0].item() == 0.0


# --------------------------------------------------------------------------------------------
# reinforce_pp, reinforce_pp_baseline
# --------------------------------------------------------------------------------------------


def test_reinforce_pp_catalog_example():
    # the catalog's "every token of row 0 gets 0.834": B1's rewards with every response 6 tokens
    # long, γ = 1 (a reconstruction: the catalog does not state the lengths; 6 reproduces it)
    adv = run("reinforce_pp", B1_REWARDS, B1_GROUPS, [[1] * 6] * 12)
    assert adv.shape == (12, 6)
    mu = sum(B1_REWARDS) / 12
    var = sum((r - mu) ** 2 for r in B1_REWARDS) * 6 / (72 - 1)
    close(adv[0], [(1 - mu) / math.sqrt(var + 1e-8)] * 6)
    close(adv[0], [0.834] * 6, rel=1e-3)
    close(adv[1], [-1.4407] * 6, rel=1e-4)
    close(adv, ref_reinforce_pp(B1_REWARDS, [[1] * 6] * 12))


def test_reinforce_pp_discount_and_reset_by_hand():
    # row 0: reward 1 at its last token (t = 2), γ = 0.5 → G = [0.25, 0.5, 1, pad];
    # row 1: token rewards [0, 1, pad-garbage] with a hole: mask [1, 0, 1, 1], outcome at t = 3
    mask = [[1, 1, 1, 0], [1, 0, 1, 1]]
    tok = torch.tensor([[0, 0, 1, NAN], [2, NAN, 0, 1]], dtype=torch.float64)
    adv = run("reinforce_pp", tok, [0, 1], mask, gamma=0.5)
    # G row 1: t3 = 1, t2 = 0 + 0.5 = 0.5, t1 (padding) reset: t0 = 2 + 0.5·m1·G1 = 2
    g = [0.25, 0.5, 1.0, 2.0, 0.5, 1.0]
    mu = sum(g) / 6
    sd = math.sqrt(sum((x - mu) ** 2 for x in g) / 5 + 1e-8)
    want = [[(0.25 - mu) / sd, (0.5 - mu) / sd, (1 - mu) / sd, 0.0], [(2 - mu) / sd, 0.0, (0.5 - mu) / sd, (1 - mu) / sd]]
    close(adv, want)
    assert torch.isfinite(adv).all()
    close(adv, ref_reinforce_pp([[0, 0, 1, 0], [2, 0, 0, 1]], mask, gamma=0.5))
    # a sequence reward lands on the last valid token
    seq = run("reinforce_pp", [1.0, 3.0], [0, 1], [[1, 1, 0], [1, 0, 0]], gamma=0.5)
    close(seq, ref_reinforce_pp([1.0, 3.0], [[1, 1, 0], [1, 0, 0]], gamma=0.5))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("token_level", [False, True])
def test_reinforce_pp_masks_with_holes(gamma, token_level):
    # masked spans inside responses (tool output), an empty row, a row that starts with a span: the
    # return restarts after each span (γ = 1 from reverse sums, γ < 1 from the loop)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(7, 9, generator=g) < 0.7).to(torch.int64)
    mask[1] = 0
    mask[2, :3] = 0
    mask = mask.tolist()
    if token_level:
        tok = torch.randn(7, 9, generator=g, dtype=torch.float64)
        rewards = torch.where(torch.tensor(mask) > 0, tok, NAN)
        want = ref_reinforce_pp([[v if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(tok.tolist(), mask)],
                                mask, gamma=gamma)
    else:
        rewards = torch.rand(7, generator=g).tolist()
        want = ref_reinforce_pp(rewards, mask, gamma=gamma)
    adv = run("reinforce_pp", rewards, list(range(7)), mask, gamma=gamma)
    assert torch.isfinite(adv).all() and (adv[torch.tensor(mask) == 0] == 0).all()
    close(adv, want, abs_=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_reinforce_pp_small_gamma_long_responses(gamma):
    # γ^(L − 1 − t) is never evaluated past a response's end, where γ^−k would overflow (0.5^−300)
    lengths = [300, 1, 157, 0]
    mask = [[1 if t < n else 0 for t in range(300)] for n in lengths]
    rewards = [1.0, -2.0, 0.5, 3.0]
    adv = run("reinforce_pp", rewards, [0, 0, 1, 1], mask, gamma=gamma)
    assert torch.isfinite(adv).all() and (adv[torch.tensor(mask) == 0] == 0).all()
    close(adv, ref_reinforce_pp(rewards, mask, gamma=gamma), abs_=1e-5)


def test_reinforce_pp_baseline_worked_example():
    mask = [[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3, [1] * 3 + [0] * 3]
    adv = run("reinforce_pp_baseline", [1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], mask)
    # centred tokens: 0.5 × 12, −0.5 × 9, 0 × 6 → μ = 1.5/27, σ² (N − 1 = 26)
    vals = [0.5] * 12 + [-0.5] * 9 + [0.0] * 6
    mu = sum(vals) / 27
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / 26 + 1e-8)
    close(adv[0], [(0.5 - mu) / sd] * 6)
    close(adv[1], [(-0.5 - mu) / sd] * 5 + [0.0])
    close(adv[4], [(0 - mu) / sd] * 3 + [0.0] * 3)  # the all-equal group is not 0 after whitening
    close([adv[0, 0], adv[1, 0], adv[4, 0]], [0.9970, -1.2463, -0.1246], rel=1e-4)
    close(adv, ref_reinforce_pp_baseline([1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], mask))
    # a token reward is summed over the valid tokens first
    tok = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, NAN], [0, 0, 0, 0, NAN, NAN], [0.5, 0, 0, 0, 0, 0.5],
                        [0, 0, 1, NAN, NAN, NAN], [1, 0, 0, NAN, NAN, NAN]], dtype=torch.float64)
    close(run("reinforce_pp_baseline", tok, [0, 0, 0, 0, 1, 1], mask), adv)


# --------------------------------------------------------------------------------------------
# group_normalize + batch_whiten = GDPO (TRL normalize_then_sum)
# --------------------------------------------------------------------------------------------

R2 = [1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1]


def trl_gdpo(r1, r2, weights, n):
    """TRL normalize_then_sum, written with its tensor ops (float64): per-function group z-score with
    nanstd + 1e-4, weighted nansum, then batch z-score with std + 1e-4."""
    per_func = torch.tensor([r1, r2], dtype=torch.float64).T  # (B, 2)
    grouped = per_func.view(-1, n, 2)
    mean_k = grouped.mean(dim=1, keepdim=True)
    std_k = grouped.std(dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, 2)
    rewards = (reward_k * torch.tensor(weights, dtype=torch.float64)).sum(dim=1)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def test_group_normalize_by_hand():
    s = run("group_normalize", [1, 1, 0, 1], [0] * 4)
    # μ = 0.75, σ = 0.5 (sample) → 0.25/0.5001, −0.75/0.5001
    close(s, [0.25 / 0.5001, 0.25 / 0.5001, -0.75 / 0.5001, 0.25 / 0.5001])
    close(run("group_normalize", B1_REWARDS, B1_GROUPS), ref_grpo(B1_REWARDS, B1_GROUPS, eps=1e-4))
    close(run("group_normalize", B1_REWARDS, B1_GROUPS, baseline="leave_one_out", eps=1e-6),
          ref_grpo(B1_REWARDS, B1_GROUPS, baseline="leave_one_out"))


def test_gdpo_composition_matches_trl():
    b = make_batch(B1_GROUPS)
    r1 = torch.tensor(B1_REWARDS, dtype=torch.float32)
    r2 = torch.tensor(R2, dtype=torch.float32)
    s = 0.7 * call("group_normalize", r1, b) + 0.3 * call("group_normalize", r2, b)
    adv = call("batch_whiten", s, b)
    close(adv, [1.2226, -0.7376, -1.7076, 1.2226, -0.7275, 0.2425, 0.2425, 0.2425, -0.5780, 1.4449, -1.1559, 0.2890],
          rel=1e-4)
    # TRL's g1 [1, 1, 1, 1] is a rounding residue / 1e-4 (here exactly 0 in float64 too); the rest agree
    close(adv, trl_gdpo(B1_REWARDS, R2, [0.7, 0.3], 4))
    # by hand: the weighted sum, then (s − mean)/(std + 1e-4)
    s_ref = [0.7 * a + 0.3 * c for a, c in zip(ref_grpo(B1_REWARDS, B1_GROUPS, eps=1e-4), ref_grpo(R2, B1_GROUPS, eps=1e-4))]
    mu, sd = sum(s_ref) / 12, statistics.stdev(s_ref)
    close(adv, [(x - mu) / (sd + 1e-4) for x in s_ref])


def test_batch_whiten_token_level_and_conventions():
    mask = [[1, 1, 0], [1, 0, 0]]
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, float("inf"), 7.0]])
    adv = run("batch_whiten", x, [0, 0], mask)
    # valid tokens 1, 2, 4: μ = 7/3, sample σ² = (16/9 + 1/9 + 25/9)/2 = 7/3
    sd = math.sqrt(7 / 3)
    close(adv, [(1 - 7 / 3) / (sd + 1e-4), (2 - 7 / 3) / (sd + 1e-4), 0, (4 - 7 / 3) / (sd + 1e-4), 0, 0])
    verl = run("batch_whiten", x, [0, 0], mask, eps=1e-8, eps_at="var")
    close(verl, [(v - 7 / 3) / math.sqrt(7 / 3 + 1e-8) if m else 0 for v, m in zip([1, 2, 0, 4, 0, 0], [1, 1, 0, 1, 0, 0])])
    pop = run("batch_whiten", x, [0, 0], mask, std="population")
    close(pop, ref_whiten([[1, 2, 0], [4, 0, 0]], mask, eps=1e-4, std="population", eps_at="std"))
    # all valid entries equal, a single valid entry, none: exactly 0
    assert run("batch_whiten", torch.tensor([[0.3, 0.3], [0.3, NAN]]), [0, 1], [[1, 1], [1, 0]]).tolist() == [[0, 0], [0, 0]]
    assert run("batch_whiten", [0.7], [0]).tolist() == [0.0]
    assert run("batch_whiten", torch.tensor([[NAN]]), [0], [[0]]).tolist() == [[0.0]]


# --------------------------------------------------------------------------------------------
# properties of every stage
# --------------------------------------------------------------------------------------------

quarters = st.integers(-8, 8).map(lambda k: k / 4)
nonneg = st.integers(0, 8).map(lambda k: k / 4)


@st.composite
def grouped_batch(draw, *, min_group=1, values=quarters):
    sizes = draw(st.lists(st.integers(min_group, 5), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    rewards = draw(st.lists(values, min_size=len(groups), max_size=len(groups)))
    if draw(st.booleans()):  # one group all equal
        g = draw(st.integers(0, len(sizes) - 1))
        v = draw(values)
        rewards = [v if gi == g else r for r, gi in zip(rewards, groups)]
    t = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, t), min_size=len(groups), max_size=len(groups)))
    mask = [[1 if j < n else 0 for j in range(t)] for n in lengths]
    order = draw(st.permutations(range(len(groups))))
    perm = draw(st.permutations(range(len(groups))))
    return ([rewards[i] for i in order], [groups[i] for i in order], [mask[i] for i in order], perm)


def check_common(name, rewards, groups, mask, perm, ref, **params):
    adv = run(name, rewards, groups, mask, **params)
    assert torch.isfinite(adv).all()
    close(adv, ref, rel=1e-5, abs_=1e-5)
    if adv.dim() == 2:
        assert (adv[torch.tensor(mask) == 0] == 0).all()  # padding is exactly 0
    # permuting the responses permutes the advantages
    prewards = rewards[perm] if torch.is_tensor(rewards) else [rewards[i] for i in perm]
    padv = run(name, prewards, [groups[i] for i in perm], [mask[i] for i in perm], **params)
    close(padv, adv[perm], rel=1e-5, abs_=1e-5)
    return adv


def flat_groups_are_zero(adv, rewards, groups):
    for idx in members(groups).values():
        if is_flat([rewards[i] for i in idx]):
            assert all(adv[i].item() == 0.0 for i in idx)


@PROPS
@given(grouped_batch(), st.sampled_from(["group", "batch"]), st.sampled_from(["sample", "population"]),
       st.booleans(), st.sampled_from(["mean", "leave_one_out"]))
def test_grpo_properties(data, scope, std, norm_by_std, baseline):
    rewards, groups, mask, perm = data
    params = dict(scope=scope, std=std, norm_by_std=norm_by_std, baseline=baseline)
    adv = check_common("grpo", rewards, groups, mask, perm, ref_grpo(rewards, groups, **params), **params)
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch(), st.sampled_from(["sample", "population"]), st.sampled_from(["mean", "leave_one_out"]))
def test_group_normalize_properties(data, std, baseline):
    rewards, groups, mask, perm = data
    want = ref_grpo(rewards, groups, std=std, baseline=baseline, eps=1e-4)
    adv = check_common("group_normalize", rewards, groups, mask, perm, want, std=std, baseline=baseline)
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch(), st.sampled_from(["keep", "zero"]))
def test_rloo_properties(data, singleton):
    rewards, groups, mask, perm = data
    adv = check_common("rloo", rewards, groups, mask, perm, ref_rloo(rewards, groups, singleton=singleton),
                       singleton=singleton)
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch())
def test_opo_properties(data):
    rewards, groups, mask, perm = data
    adv = check_common("opo", rewards, groups, mask, perm, ref_opo(rewards, groups, [sum(m) for m in mask]))
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch(), st.sampled_from(["nonzero_reward", "nonzero_advantage", "none"]), st.sampled_from([1.0, 2.5]))
def test_gpg_properties(data, alpha, f_norm):
    rewards, groups, mask, perm = data
    adv = check_common("gpg", rewards, groups, mask, perm, ref_gpg(rewards, groups, alpha=alpha, f_norm=f_norm),
                       alpha=alpha, f_norm=f_norm)
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch(min_group=2), st.booleans(), st.sampled_from(["sample", "population"]))
def test_grpo_passk_properties(data, norm_by_std, std):
    rewards, groups, mask, perm = data
    adv = check_common("grpo_passk", rewards, groups, mask, perm,
                       ref_passk(rewards, groups, norm_by_std=norm_by_std, std=std), norm_by_std=norm_by_std, std=std)
    flat_groups_are_zero(adv, rewards, groups)
    for idx in members(groups).values():  # at most one credited response per group, never negative
        assert sum(adv[i].item() != 0 for i in idx) <= 1 and all(adv[i].item() >= 0 for i in idx)


@PROPS
@given(grouped_batch(values=nonneg), st.sampled_from(["mean_zero", "zero"]))
def test_maxrl_properties(data, singleton):
    rewards, groups, mask, perm = data
    adv = check_common("maxrl", rewards, groups, mask, perm, ref_maxrl(rewards, groups, singleton=singleton),
                       singleton=singleton)
    flat_groups_are_zero(adv, rewards, groups)


@PROPS
@given(grouped_batch(), st.sampled_from(["sample", "population"]), st.sampled_from(["std", "var"]), st.booleans())
def test_batch_whiten_properties(data, std, eps_at, token_level):
    rewards, groups, mask, perm = data
    eps = 1e-4 if eps_at == "std" else 1e-8
    if token_level:  # a token signal: one value per token, NaN on padding
        x = [[rewards[i] + j / 4 if m else NAN for j, m in enumerate(mrow)] for i, mrow in enumerate(mask)]
        want = ref_whiten([[v if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(x, mask)], mask,
                          eps=eps, std=std, eps_at=eps_at)
        adv = run("batch_whiten", torch.tensor(x), groups, mask, eps=eps, std=std, eps_at=eps_at)
        assert torch.isfinite(adv).all() and (adv[torch.tensor(mask) == 0] == 0).all()
        close(adv, want, abs_=1e-5)
        padv = run("batch_whiten", torch.tensor(x)[perm], [groups[i] for i in perm], [mask[i] for i in perm],
                   eps=eps, std=std, eps_at=eps_at)
        close(padv, adv[perm], abs_=1e-5)
    else:
        want = ref_whiten([[r] for r in rewards], [[1]] * len(rewards), eps=eps, std=std, eps_at=eps_at)
        check_common("batch_whiten", rewards, groups, mask, perm, want, eps=eps, std=std, eps_at=eps_at)
    if len(set(rewards)) == 1 and not token_level:
        assert run("batch_whiten", rewards, groups).abs().max().item() == 0.0


@PROPS
@given(grouped_batch(), st.sampled_from([1.0, 0.9, 0.0]), st.sampled_from(["sample", "population"]), st.booleans())
def test_reinforce_pp_properties(data, gamma, std, token_level):
    rewards, groups, mask, perm = data
    if token_level:  # token rewards, NaN on padding
        tok = [[rewards[i] * (j + 1) / 4 if m else NAN for j, m in enumerate(mrow)] for i, mrow in enumerate(mask)]
        want = ref_reinforce_pp([[v if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(tok, mask)], mask,
                                gamma=gamma, std=std)
        adv = check_common("reinforce_pp", torch.tensor(tok), groups, mask, perm, want, gamma=gamma, std=std)
    else:
        want = ref_reinforce_pp(rewards, mask, gamma=gamma, std=std)
        adv = check_common("reinforce_pp", rewards, groups, mask, perm, want, gamma=gamma, std=std)
    assert adv.shape == (len(rewards), len(mask[0]))


@PROPS
@given(grouped_batch(), st.sampled_from(["sample", "population"]))
def test_reinforce_pp_baseline_properties(data, std):
    rewards, groups, mask, perm = data
    adv = check_common("reinforce_pp_baseline", rewards, groups, mask, perm,
                       ref_reinforce_pp_baseline(rewards, groups, mask, std=std), std=std)
    # an all-equal group is one value on all its valid tokens (−μ/σ, or 0 when the batch is flat)
    for idx in members(groups).values():
        if is_flat([rewards[i] for i in idx]):
            vals = {adv[i, t].item() for i in idx for t in range(len(mask[i])) if mask[i][t]}
            assert len(vals) <= 1


# --------------------------------------------------------------------------------------------
# docs, composition in a spec, lazy torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, texts", [
    ("rloo", ["A_i = r_i − (1/(n − 1)) Σ_{j∈g, j≠i} r_j", "singleton: one of 'keep', 'zero' = 'keep'",
              "arXiv:2402.14740"]),
    ("grpo", ["A_i = (r_i − b_i) / (σ_i + eps)", "baseline: one of 'mean', 'leave_one_out' = 'mean'",
              "norm_by_std", "eps: number = 1e-06", "std", "scope", "NeMo-RL"]),
    ("reinforce_pp", ["G_{i,t} = r_{i,t} + γ · m_{i,t+1} · G_{i,t+1}", "gamma: number = 1.0  (>= 0 and <= 1)",
                      "eps: number = 1e-08", "std: one of 'sample', 'population'", "arXiv:2501.03262",
                      "reinforce_pp(rewards: Signal[*], groups: Rollouts, gamma=..., eps=..., std=...) -> Advantage[tok]"]),
])
def test_stage_doc_page(name, texts, capsys):
    stage_page_shows(name, texts, capsys)


GDPO_SPEC = """\
spec gdpo {
  title = "GDPO: group reward-decoupled normalization"
  cite  = "Liu et al. 2026, arXiv:2601.05242"
}
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = tasks.arithmetic(digits = 2)
rollout   groups  = rollouts.sample(policy, prompts, n = 8)
verify    correct = verifiers.exact_answer(groups)
verify    fmt     = verifiers.format(groups, regex = "[0-9]+")
advantage adv     = batch_whiten(0.7 * group_normalize(correct, groups) + 0.3 * group_normalize(fmt, groups), groups)
advantage adv2    = reinforce_pp(correct, groups, gamma = 0.99) + rloo(correct, groups)
objective loss    = losses.ppo_clip(adv, groups) + losses.ppo_clip(adv2, groups)
"""


def test_gdpo_composes_in_a_spec(tmp_path):
    from shapeflow.compiler.pipeline import compile_spec

    path = tmp_path / "gdpo.shape"
    path.write_text(GDPO_SPEC)
    compiled = compile_spec(Path(path))
    assert compiled.diagnostics == []
    types = {b: str(compiled.program.nodes[n].type) for b, n in compiled.program.bindings.items()}
    assert types["adv"] == "Advantage[seq]" and types["adv2"] == "Advantage[tok]"


def test_importing_the_stages_does_not_import_torch():
    code = "import sys, shapeflow.stdlib.advantages, shapeflow.stdlib.functional; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_remax_worked_example():
    """Outcome rewards [1, 0] of one prompt whose greedy response scored 1; lengths 2 and 1."""
    from conftest import call, make_batch

    batch = make_batch([0, 0], [[1, 1], [1, 0]], extra={"greedy_baseline": [1.0, 1.0]})
    got = call("remax", torch.tensor([1.0, 0.0]), batch)
    assert got.tolist() == [[0.0, 0.0], [-1.0, 0.0]]


def test_remax_token_rewards_use_the_reward_to_go():
    from conftest import call, make_batch

    batch = make_batch([0], [[1, 1, 1]], extra={"greedy_baseline": [0.5]})
    got = call("remax", torch.tensor([[0.1, 0.2, 0.7]]), batch)
    assert got[0].tolist() == pytest.approx([0.5, 0.4, 0.2])


def test_remax_empty_row_is_zero_even_with_a_nan_reward():
    from conftest import call, make_batch

    batch = make_batch([0, 0, 1], [[1, 1], [0, 0], [1, 0]], extra={"greedy_baseline": [1.0, 1.0, 0.0]})
    got = call("remax", torch.tensor([0.0, NAN, 2.0]), batch)
    assert got.tolist() == [[-1.0, -1.0], [0.0, 0.0], [2.0, 0.0]]


@pytest.mark.parametrize("name", ["grpo", "group_normalize"])
def test_flat_group_is_zero_with_eps_zero(name):
    # σ = 0 in a flat group: with eps = 0 its A must stay exactly 0 (never 0 · 1/0); a singleton keeps r
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 0.7]  # the flat group's mean is exact: σ = 0 exactly
    adv = run(name, rewards, [0, 0, 0, 1, 1, 2], eps=0.0)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    close(adv[3:], [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.7])  # group [1, 0]: μ = 0.5, σ = sqrt(0.5)
