"""Worked-example and property tests of the issue-5 reward shaping stages: PAR and its baselines
(catalog A §11), XRPO's novelty sharpening (catalog B §3.2), ASPO Eq. (1) and (2) (catalog C §1)
and R³'s ranking and length rewards (catalog B §3.7).

Expected numbers are the catalogs' worked examples (written next to each case) or come from the
per-response Python references below, in float64 and independent of the stages and of
shapeflow's helpers.
"""

from __future__ import annotations

import math
import re
import statistics
from statistics import NormalDist

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import call, make_batch, spec_trainer  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402
from shapeflow.stdlib.shaping_rewards import (  # noqa: E402
    RunningStats,
    fitted_poly,
    fitted_poly_coefficients,
    par_running,
    running_stats_update,
)

PROPS = settings(derandomize=True, max_examples=60, deadline=None, database=None)
NAN = float("nan")
T = torch.tensor

# catalog A §11: four responses, each with its prompt's three references
PAR_R = [2.0, 0.5, -1.0, 4.0]
PAR_REFS = [[1, 1.5, 0.5], [1, 1.5, 0.5], [0, -0.5, 0.2], [1, 2, 3]]


def close(got, want, rel=1e-5, abs_=1e-6):
    """Every entry within rel · max(1, |want|) (and abs_ for values near 0)."""
    got = torch.as_tensor(got, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(want, dtype=torch.float64).flatten().tolist()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= max(rel * max(1.0, abs(w)), abs_), (got, want)


def f32(x):
    return torch.as_tensor(x, dtype=torch.float32)


def members(groups):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def par_layout(rewards, refs_per_response):
    """The catalog's 'each response with its own references' as shapeflow groups: response i
    becomes the first member of a group of len(refs) responses carrying the references."""
    groups, r, ref, first = [], [], [], []
    for g, (ri, refs) in enumerate(zip(rewards, refs_per_response)):
        first.append(len(r))
        for j, v in enumerate(refs):
            groups.append(g)
            r.append(ri if j == 0 else 0.0)
            ref.append(v)
    return make_batch(groups), f32(r), f32(ref), first


def par_call(name, rewards=PAR_R, refs=PAR_REFS, **params):
    batch, r, ref, first = par_layout(rewards, refs)
    return call(name, r, ref, batch, **params)[first]


# --------------------------------------------------------------------------------------------
# independent references (per-response Python loops, float64)
# --------------------------------------------------------------------------------------------


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def poly(x):
    if x <= -5:
        return 0.0
    if x >= 5:
        return 1.0
    return sum(c * x**p for c, p in zip(fitted_poly_coefficients(), (5, 4, 3, 2, 1, 0)))


BOUNDED = {"sigmoid": sigmoid, "tanh": math.tanh, "arctan": math.atan, "fitted_poly": poly, "identity": lambda x: x}


def group_refs(ref, groups, max_refs):
    """The references of each response: ``ref`` on the first max_refs members of its group."""
    out = [None] * len(ref)
    for idx in members(groups).values():
        refs = [ref[j] for j in idx][: max_refs if max_refs is not None else len(idx)]
        for i in idx:
            out[i] = refs
    return out


def ref_relative(r, ref, groups, fn, *, k=1.0, shift=0.0, max_refs=10):
    f = BOUNDED[fn]
    scale = k if fn == "sigmoid" else 1.0
    return [sum(f(scale * (ri - shift - m)) for m in refs) / len(refs)
            for ri, refs in zip(r, group_refs(ref, groups, max_refs))]


def ref_lsc(r, ref, groups, *, quantile=0.85, scale_eps=1e-5, max_refs=None):
    out = []
    for ri, refs in zip(r, group_refs(ref, groups, max_refs)):
        mu = sum(refs) / len(refs)
        s = statistics.stdev(refs) if len(refs) > 1 else 0.0  # PAR utils.std: n − 1 only when n > 1
        r_q = mu + NormalDist().inv_cdf(quantile) * (s + scale_eps)  # scipy norm.ppf(q, mu, s + 1e-5)
        out.append(math.log(sigmoid(ri - r_q)))
    return out


def ref_running(batches, mode):
    """Every batch shaped with the statistics of all rewards seen so far (this batch included)."""
    seen, out = [], []
    lo, hi = 10000.0, -10000.0
    for batch in batches:
        seen += batch
        lo, hi = min(lo, *batch), max(hi, *batch)
        mu = sum(seen) / len(seen)
        sd = statistics.pstdev(seen) if len(seen) > 1 else 0.0
        if mode == "meanstd":
            out.append([(x - mu) / (sd if sd > 0 else 1.0) for x in batch])
        elif mode == "clip":
            out.append([min(max(x, mu - sd), mu + sd) for x in batch])
        else:
            out.append([(x - lo) / (hi - lo) if hi != lo else 0.0 for x in batch])
    return out


def ref_xrpo(adv, groups, logprobs, mask, *, lam=2.5, kappa=0.5, mean_over="group"):
    s = []
    for lp, m in zip(logprobs, mask):
        vals = [x for x, v in zip(lp, m) if v]
        s.append(sum(vals) / len(vals) if vals else 0.0)
    out = list(adv)
    for idx in members(groups).values():
        pool = [s[i] for i in idx if mean_over == "group" or adv[i] > 0]
        s_bar = sum(pool) / len(pool) if pool else 0.0
        for i in idx:
            if adv[i] > 0:
                eta = math.exp(s[i] - s_bar)
                out[i] = adv[i] + min(max(lam * (1 - eta), 0.0), kappa * adv[i])
    return out


def first_call(text, marker, regex):
    if regex:
        m = re.search(marker, text)
        return m.start() if m else None
    i = text.find(marker)
    return i if i >= 0 else None


def ref_aspo(adv, correct, groups, texts, marker, *, regex=False, delta=-2.0, k=0.7):
    out = list(adv)
    for idx in members(groups).values():
        elig = [i for i in idx if correct[i] > 0 and first_call(texts[i], marker, regex) is not None]
        if not elig:
            continue
        p_bar = sum(first_call(texts[i], marker, regex) for i in elig) / len(elig)
        l_bar = sum(len(texts[i]) for i in elig) / len(elig)
        for i in elig:
            b = delta * (first_call(texts[i], marker, regex) - p_bar) / l_bar if l_bar > 0 else 0.0
            cap = k * abs(adv[i])
            out[i] = adv[i] + min(max(b, -cap), cap)
    return out


def ref_aspo_reward(correct, groups, texts, marker, *, delta, c, std="sample", regex=False):
    out = [0.0] * len(correct)
    for idx in members(groups).values():
        elig = [i for i in idx if correct[i] > 0 and first_call(texts[i], marker, regex) is not None]
        ps = [first_call(texts[i], marker, regex) for i in elig]
        if not ps:
            continue
        mu = sum(ps) / len(ps)
        if std == "sample":
            sd = statistics.stdev(ps) if len(ps) > 1 else 0.0
        else:
            sd = statistics.pstdev(ps)
        for i, p in zip(elig, ps):
            z = (p - mu) / sd if sd > 0 else 0.0
            out[i] = delta * min(max(z, -c), c)
    return out


def ref_serr(correct, groups, entropy, mask, truncated, *, p, r_max, eligible="truncated", ties="index"):
    out = [0.0] * len(correct)
    for idx in members(groups).values():
        if max(correct[i] for i in idx) > 0:
            continue
        ranked = [i for i in idx if sum(mask[i]) > 0 and (eligible == "failed" or truncated[i])]
        n = len(ranked)
        if n < 2:
            continue
        peak, glob = {}, {}
        for i in ranked:
            h = [x for x, m in zip(entropy[i], mask[i]) if m]
            k = max(1, math.floor(p * len(h)))
            peak[i] = sum(sorted(h, reverse=True)[:k]) / k
            glob[i] = sum(h) / len(h)
        score = {i: sum(1 for j in ranked if j != i and peak[i] > peak[j] and glob[i] < glob[j]) for i in ranked}
        if ties == "index":
            order = sorted(ranked, key=lambda i: (-score[i], idx.index(i)))
            rank = {i: order.index(i) for i in ranked}
        else:
            rank = {i: sum(score[j] > score[i] for j in ranked) + (sum(score[j] == score[i] for j in ranked) - 1) / 2
                    for i in ranked}
        for i in ranked:
            out[i] = r_max * (1 - rank[i] / (n - 1))
    return out


# --------------------------------------------------------------------------------------------
# PAR (catalog A §11)
# --------------------------------------------------------------------------------------------


def test_par_worked_example():
    close(par_call("par.preference"), [0.7237, 0.3822, 0.2927, 0.8548], rel=1e-4, abs_=5e-5)
    close(par_call("par.centered"), [1.0, -0.5, -0.9, 2.0])
    close(par_call("par.relative", fn="tanh"), [0.7096, -0.4079, -0.6858, 0.9069], rel=1e-4, abs_=5e-5)
    close(par_call("par.lsc"), [-0.4810, -1.3266, -1.5204, -0.3232], rel=1e-4, abs_=5e-5)
    close(call("par.bounded", f32(PAR_R), fn="sigmoid"), [0.8808, 0.6225, 0.2689, 0.9820], rel=1e-4, abs_=5e-5)
    close(par_call("par.sgfc")[:1], [0.1258], rel=1e-4, abs_=5e-5)  # docstring: (σ(−2) + σ(−2.5) + σ(−1.5))/3


def test_par_matches_the_references_formula_exactly():
    """The same example against the float64 loops, to 1e-5."""
    for fn in ("tanh", "arctan", "fitted_poly"):
        batch, r, ref, first = par_layout(PAR_R, PAR_REFS)
        want = ref_relative(r.tolist(), ref.tolist(), batch.group_index.tolist(), fn)
        close(call("par.relative", r, ref, batch, fn=fn), want)
    batch, r, ref, first = par_layout(PAR_R, PAR_REFS)
    close(call("par.preference", r, ref, batch), ref_relative(r.tolist(), ref.tolist(), batch.group_index.tolist(),
                                                               "sigmoid"))
    close(call("par.lsc", r, ref, batch), ref_lsc(r.tolist(), ref.tolist(), batch.group_index.tolist()))


def test_par_running_statistics_first_batch():
    r = f32(PAR_R)
    for mode, want in (("meanstd", [0.3379, -0.4730, -1.2839, 1.4190]),
                       ("clip", [2.0, 0.5, -0.4748, 3.2248]),
                       ("minmax", [0.6, 0.3, 0.0, 1.0])):
        got, state = par_running(r, RunningStats(), mode)
        close(got, want, rel=1e-4, abs_=5e-5)
        assert state.n == 4 and state.mean == pytest.approx(1.375) and state.std == pytest.approx(1.849831, rel=1e-6)


def test_par_length_penalty_example():
    """Responses of 310 tokens lose 0.1 (0.01 per token beyond 300); 300 tokens lose nothing."""
    batch = make_batch([0, 0, 1, 1], torch.ones(4, 310))
    close(f32(PAR_R) + call("par.length_penalty", batch), [1.9, 0.4, -1.1, 3.9])
    short = make_batch([0, 0], [[1] * 300 + [0] * 10, [1] * 7 + [0] * 303])
    assert call("par.length_penalty", short).tolist() == [0.0, 0.0]


def test_par_ceil():
    assert call("par.ceil", T([2.0, 0.5]), ceil=1.0).tolist() == [1.0, 0.5]


def test_lsc_single_reference_has_scale_1e_5():
    """PAR's corner case: one reference → sample std 0, so r_q = r_ref + 1.03643e-5."""
    batch = make_batch([0])
    got = call("par.lsc", T([1.0]), T([1.0]), batch)
    want = math.log(sigmoid(-NormalDist().inv_cdf(0.85) * 1e-5))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert got.item() == pytest.approx(-0.69315, abs=1e-5)


def test_lsc_uses_every_reference_unless_told():
    """The code ignores reward_maxref in LSC (max_refs = none); a number honours it."""
    batch, r, ref, first = par_layout([2.0], [[1, 1.5, 0.5]])
    all_refs = call("par.lsc", r, ref, batch)[0].item()
    assert all_refs == pytest.approx(-0.4810, abs=5e-5)
    one = call("par.lsc", r, ref, batch, max_refs=1)[0].item()
    assert one == pytest.approx(math.log(sigmoid(2.0 - 1.0 - NormalDist().inv_cdf(0.85) * 1e-5)), rel=1e-6)
    # preference honours max_refs: only the first reference
    assert call("par.preference", r, ref, batch, max_refs=1)[0].item() == pytest.approx(sigmoid(1.0), rel=1e-6)


def test_fitted_poly_is_the_codes_fit():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    def model(x, a, b, c, d, e, f):
        return a * x**5 + b * x**4 + c * x**3 + d * x**2 + e * x + f

    xs = np.linspace(-5, 5, 100)
    params, _ = scipy_optimize.curve_fit(model, xs, 1 / (1 + np.exp(-xs)))  # as PAR's RewardShaper
    probe = torch.tensor([-6.0, -5.0, -4.9, -2.0, -0.3, 0.0, 0.7, 3.0, 4.99, 5.0, 8.0], dtype=torch.float64)
    want = [0.0 if x <= -5 else 1.0 if x >= 5 else model(x, *params) for x in probe.tolist()]
    close(fitted_poly(probe), want, rel=1e-5, abs_=2e-6)


def test_running_statistics_across_batches_match_the_history():
    batches = [[2.0, 0.5, -1.0, 4.0], [0.25], [3.0, 3.0, -2.5], [1.0, 7.5]]
    for mode in ("meanstd", "clip", "minmax"):
        state = RunningStats()
        for batch, want in zip(batches, ref_running(batches, mode)):
            got, state = par_running(f32(batch), state, mode)
            close(got, want)


def test_running_statistics_corner_cases():
    first, state = par_running(T([3.0]), RunningStats(), "meanstd")  # n = 1: variance 0, divide by 1
    assert first.tolist() == [0.0] and state.variance == 0.0
    flat, _ = par_running(T([2.0, 2.0]), RunningStats(), "minmax")  # max = min: 0, not NaN
    assert flat.tolist() == [0.0, 0.0]
    assert running_stats_update(RunningStats(), T([])) == RunningStats()


def test_reference_answers_view_scores_the_answer():
    batch = make_batch([0, 0, 1], T([[1, 1], [1, 0], [1, 1]]), responses=["65", "6", "x"], answers=["65", "65", "7"])
    view = call("rollouts.reference_answers", batch)
    assert view.responses == ["65", "65", "7"] and view.size == 3 and view.mask.shape == (3, 0)
    assert call("verifiers.exact_answer", view).tolist() == [1.0, 1.0, 1.0]
    assert call("par.preference", call("verifiers.exact_answer", batch), call("verifiers.exact_answer", view),
                batch).tolist() == pytest.approx([0.5, sigmoid(-1), sigmoid(-1)])


def test_reference_answers_view_rescores_task_scores():
    from shapeflow.stdlib.tasks import Example, TaskData

    task = TaskData("t", "train", (), scorer=lambda e, text: float(len(text)))
    examples = [Example("p0", "q", "123"), Example("p1", "q", "7")]
    batch = make_batch([0, 1], responses=["1", "22"], answers=["123", "7"], examples=examples, task=task,
                       scores={"task": T([1.0, 2.0])})
    view = call("rollouts.reference_answers", batch)
    assert call("rewards.recorded", view, key="task").tolist() == [3.0, 1.0]


def test_recorded_reference_rewards_wire_into_par():
    """Recorded reference rewards (one per response: the prompt's j-th reference on its j-th response)."""
    batch, r, ref, first = par_layout(PAR_R, PAR_REFS)
    batch.scores = {"ref_reward": ref}
    got = call("par.preference", r, call("rewards.recorded", batch, key="ref_reward"), batch)[first]
    close(got, [0.7237, 0.3822, 0.2927, 0.8548], rel=1e-4, abs_=5e-5)


# --------------------------------------------------------------------------------------------
# XRPO (catalog B §3.2)
# --------------------------------------------------------------------------------------------


def test_xrpo_worked_example():
    batch = make_batch([0, 0, 0, 0], logprobs=[[-0.2], [-0.6], [-0.4], [-0.3]])
    a = T([0.866, 0.866, -0.866, -0.866])
    got = call("xrpo.novelty_sharpen", a, batch)
    close(got, [0.866, 1.299, -0.866, -0.866])
    eta = [math.exp(s + 0.375) for s in (-0.2, -0.6, -0.4, -0.3)]
    close(eta, [1.191, 0.799, 0.975, 1.078], rel=1e-3)
    assert got[1].item() == pytest.approx(0.866 * 1.5, rel=1e-6)  # the bonus is capped at κ·A = 0.433
    # through grpo, from the rewards
    adv = call("grpo", T([1.0, 1.0, 0.0, 0.0]), batch)
    close(call("xrpo.novelty_sharpen", adv, batch), [0.866, 1.299, -0.866, -0.866], rel=1e-3)


def test_xrpo_mean_over_positive_and_padding():
    """s is the mean over valid tokens only (NaN padding cannot leak); s̄ over A > 0 when asked."""
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    lp = [[-0.2, -0.4, NAN], [-1.0, NAN, 5.0], [-0.1, -0.1, -0.1]]
    batch = make_batch([0, 0, 0], mask, logprobs=lp)
    a = T([0.5, 0.3, -0.8])
    for mean_over in ("group", "positive"):
        got = call("xrpo.novelty_sharpen", a, batch, mean_over=mean_over)
        close(got, ref_xrpo(a.tolist(), [0, 0, 0], lp, mask, mean_over=mean_over))


# --------------------------------------------------------------------------------------------
# ASPO (catalog C §1)
# --------------------------------------------------------------------------------------------

ASPO_R = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
ASPO_P = [50, 400, None, 120, 900, 30]
ASPO_L = [1000, 1200, 800, 600, 1500, 900]


def aspo_texts(positions, lengths, marker="<code>"):
    return [("a" * p + marker).ljust(n, "b") if p is not None else "c" * n for p, n in zip(positions, lengths)]


@pytest.mark.parametrize("delta, k, want", [
    (-2.0, 0.7, [1.0973, 0.7266, 0.6455, -1.2910, 0.1936, -1.2910]),   # paper "conservative"
    (-2.5, 0.9, [1.2264, 0.7468, 0.6455, -1.2910, 0.0645, -1.2910]),   # paper "aggressive"
    (-1.5, 0.7, [1.0973, 0.7063, 0.6455, -1.2910, 0.1936, -1.2910]),   # figure legend
])
def test_aspo_worked_example(delta, k, want):
    batch = make_batch([0] * 6, responses=aspo_texts(ASPO_P, ASPO_L))
    correct = T(ASPO_R)
    adv = call("grpo", correct, batch)
    close(adv, [0.6455, 0.6455, 0.6455, -1.2910, 0.6455, -1.2910], rel=1e-4, abs_=5e-5)
    got = call("aspo.early_call_bonus", adv, correct, batch, marker="<code>", delta=delta, k=k)
    close(got, want, rel=1e-4, abs_=5e-5)
    close(got, ref_aspo(adv.tolist(), ASPO_R, [0] * 6, batch.responses, "<code>", delta=delta, k=k))


def test_aspo_all_correct_group_is_unchanged():
    batch = make_batch([0] * 4, responses=aspo_texts([50, 400, 900, 120], [1000] * 4))
    correct = T([1.0] * 4)
    adv = call("grpo", correct, batch)
    assert call("aspo.early_call_bonus", adv, correct, batch, marker="<code>").tolist() == [0.0] * 4


def test_aspo_regex_marker_and_negative_advantage_guard():
    texts = ["x = 1\n```python\nprint(1)```", "```py\n", "no code", "ab```python"]
    batch = make_batch([0, 0, 0, 0], responses=texts)
    correct, adv = T([1.0, 1.0, 1.0, 1.0]), T([0.4, -0.3, 0.2, 0.9])
    got = call("aspo.early_call_bonus", adv, correct, batch, marker=r"```py(thon)?", regex=True)
    close(got, ref_aspo(adv.tolist(), [1] * 4, [0] * 4, texts, r"```py(thon)?", regex=True))
    assert abs(got[1].item() + 0.3) <= 0.7 * 0.3 + 1e-6  # A < 0: the clip is ±k·|A|, so no sign flip
    with pytest.raises(Exception, match="invalid regular expression"):
        call("aspo.early_call_bonus", adv, correct, batch, marker="(", regex=True)


def test_aspo_reward_variant_worked_example():
    """Eq. (1) on an all-correct group: half the correct responses end up below average."""
    batch = make_batch([0] * 4, responses=aspo_texts([50, 400, 900, 120], [1000] * 4))
    correct = T([1.0] * 4)
    bonus = call("aspo.early_call_reward", correct, batch, marker="<code>", delta=-2.0, c=1.0)
    close(correct + bonus, [2.6457, 0.8315, -1.0, 2.2828], rel=1e-4, abs_=5e-5)
    close(call("grpo", correct + bonus, batch), [0.8784, -0.2163, -1.3216, 0.6595], rel=1e-4, abs_=5e-5)
    for std in ("sample", "population"):
        close(call("aspo.early_call_reward", correct, batch, marker="<code>", delta=-2.0, c=1.0, std=std),
              ref_aspo_reward([1] * 4, [0] * 4, batch.responses, "<code>", delta=-2.0, c=1.0, std=std))


# --------------------------------------------------------------------------------------------
# R³ (catalog B §3.7)
# --------------------------------------------------------------------------------------------

# five-token responses whose top-1 entropy (p = 0.2) and mean give the catalog's E_peak, E_global
R3_ENTROPY = [[2.25, 0.15, 0.15, 0.15, 0.15], [1.15, 0.95, 0.95, 0.95, 0.95],
              [0.2, 0.1, 0.1, 0.1, 0.1], [2.95, 1.025, 1.025, 1.025, 1.025]]


def test_r3_worked_example():
    truncated = torch.ones(4, dtype=torch.bool)
    batch = make_batch([0] * 4, torch.ones(4, 5), entropy=R3_ENTROPY, truncated=truncated)
    serr = call("r3.entropy_rank_reward", torch.zeros(4), batch, p=0.2, r_max=0.5)
    close(serr, [0.5, 1 / 3, 1 / 6, 0.0])
    close(serr, ref_serr([0] * 4, [0] * 4, R3_ENTROPY, [[1] * 5] * 4, [True] * 4, p=0.2, r_max=0.5))
    # one replayed success joins the group: eq. 3 with α = 1, λ = 1e-6, population std
    mixed = call("grpo", torch.cat([serr, T([1.0])]), make_batch([0] * 5), std="population", eps=1e-6)
    close(mixed, [0.291, -0.194, -0.680, -1.166, 1.748], rel=1e-3, abs_=1e-3)


def test_r3_only_all_failed_groups_and_only_truncated_responses():
    ent = R3_ENTROPY + R3_ENTROPY
    truncated = T([True, True, False, True, True, True, True, True])
    correct = T([0.0] * 4 + [0.0, 1.0, 0.0, 0.0])  # the second group has a success: no SERR there
    batch = make_batch([0] * 4 + [1] * 4, torch.ones(8, 5), entropy=ent, truncated=truncated)
    got = call("r3.entropy_rank_reward", correct, batch, p=0.2, r_max=0.5)
    close(got, [0.5, 0.25, 0.0, 0.0, 0, 0, 0, 0])  # response 2 is not truncated: N = 3
    got = call("r3.entropy_rank_reward", correct, batch, p=0.2, r_max=0.5, eligible="failed")
    close(got, [0.5, 1 / 3, 1 / 6, 0.0, 0, 0, 0, 0])
    single = make_batch([0, 0], torch.ones(2, 5), entropy=R3_ENTROPY[:2], truncated=T([True, False]))
    assert call("r3.entropy_rank_reward", torch.zeros(2), single, p=0.2, r_max=0.5).tolist() == [0.0, 0.0]


def test_r3_average_ties():
    batch = make_batch([0] * 4, torch.ones(4, 5), entropy=R3_ENTROPY, truncated=torch.ones(4, dtype=torch.bool))
    got = call("r3.entropy_rank_reward", torch.zeros(4), batch, p=0.2, r_max=0.5, ties="average")
    close(got, [0.5, 0.5 * (1 - 2 / 3), 0.5 * (1 - 2 / 3), 0.5 * (1 - 2 / 3)])  # three tied at rank 2 of 1..3


def test_r3_length_reward_example():
    batch = make_batch([0, 0, 0], [[1, 1] + [0] * 10, [1] * 12, [1, 1] + [0] * 10])
    close(call("r3.length_reward", T([1.0, 1.0, 0.0]), batch, max_len=10), [0.8, 0.0, 0.0])


# --------------------------------------------------------------------------------------------
# properties on random batches
# --------------------------------------------------------------------------------------------

quarters = st.integers(-8, 8).map(lambda k: k / 4)
nonneg = st.integers(0, 8).map(lambda k: k / 4)


@st.composite
def grouped(draw, *, values=quarters):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    B = len(groups)
    rewards = draw(st.lists(values, min_size=B, max_size=B))
    refs = draw(st.lists(values, min_size=B, max_size=B))
    flat = None
    if draw(st.booleans()):  # one group whose rewards and references are all the same value
        g, v = draw(st.integers(0, len(sizes) - 1)), draw(values)
        flat = g
        rewards = [v if gi == g else r for r, gi in zip(rewards, groups)]
        refs = [v if gi == g else r for r, gi in zip(refs, groups)]
    t = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, t), min_size=B, max_size=B))
    mask = [[1 if j < n else 0 for j in range(t)] for n in lengths]
    tok = draw(st.lists(st.lists(nonneg, min_size=t, max_size=t), min_size=B, max_size=B))
    tok = [[x if m else NAN for x, m in zip(row, mrow)] for row, mrow in zip(tok, mask)]  # NaN padding
    perm = draw(st.permutations(range(B)))
    return dict(rewards=rewards, refs=refs, groups=groups, mask=mask, tok=tok, perm=perm,
                flat=flat, lengths=lengths)


def permuted(d, perm):
    return {k: ([v[i] for i in perm] if isinstance(v, list) and k != "perm" else v) for k, v in d.items()}


def check(got, want, d, run):
    assert torch.isfinite(got).all()
    close(got, want, rel=1e-5, abs_=1e-5)
    # permuting the responses (group labels travel with them) permutes the output
    pd = permuted(d, d["perm"])
    close(run(pd), got[d["perm"]], rel=1e-5, abs_=1e-5)


@PROPS
@given(grouped(), st.sampled_from(["sigmoid", "tanh", "arctan", "fitted_poly", "identity", "sgfc"]),
       st.sampled_from([1.0, 2.0]))
def test_par_relative_properties(d, fn, k):
    def run(d):
        batch = make_batch(d["groups"])
        r, ref = f32(d["rewards"]), f32(d["refs"])
        if fn == "sigmoid":
            return call("par.preference", r, ref, batch, k=k)
        if fn == "sgfc":
            return call("par.sgfc", r, ref, batch, k=k)
        if fn == "identity":
            return call("par.centered", r, ref, batch)
        return call("par.relative", r, ref, batch, fn=fn)

    got = run(d)
    name = "sigmoid" if fn == "sgfc" else fn
    want = ref_relative(d["rewards"], d["refs"], d["groups"], name, k=k, shift=3.0 if fn == "sgfc" else 0.0)
    check(got, want, d, run)
    if d["flat"] is not None:  # rewards equal to references: f(0) on every response
        f0 = {"sigmoid": 0.5, "tanh": 0.0, "arctan": 0.0, "fitted_poly": 0.5, "identity": 0.0}.get(fn)
        if fn == "sgfc":
            f0 = sigmoid(-3 * k)
        idx = members(d["groups"])[d["flat"]]
        close(got[idx], [f0] * len(idx), rel=1e-5, abs_=1e-5)


@PROPS
@given(grouped(), st.sampled_from([None, 1, 2]), st.sampled_from([0.85, 0.5]))
def test_par_lsc_properties(d, max_refs, quantile):
    def run(d):
        return call("par.lsc", f32(d["rewards"]), f32(d["refs"]), make_batch(d["groups"]), max_refs=max_refs,
                    quantile=quantile)

    got = run(d)
    want = ref_lsc(d["rewards"], d["refs"], d["groups"], max_refs=max_refs, quantile=quantile)
    assert torch.isfinite(got).all() and (got < 0).all()
    close(got, want, rel=1e-5, abs_=1e-5)
    if max_refs is None:  # the first M depend on batch order; all of them do not
        close(run(permuted(d, d["perm"])), got[d["perm"]], rel=1e-5, abs_=1e-5)


@PROPS
@given(grouped(), st.sampled_from(["sigmoid", "tanh", "arctan", "fitted_poly"]))
def test_par_bounded_properties(d, fn):
    def run(d):
        return call("par.bounded", f32(d["rewards"]), fn=fn)

    check(run(d), [BOUNDED[fn](x) for x in d["rewards"]], d, run)


@PROPS
@given(st.lists(st.lists(quarters, min_size=1, max_size=5), min_size=1, max_size=4),
       st.sampled_from(["meanstd", "clip", "minmax"]))
def test_par_running_properties(batches, mode):
    state = RunningStats()
    for batch, want in zip(batches, ref_running(batches, mode)):
        got, state = par_running(f32(batch), state, mode)
        assert torch.isfinite(got).all()
        close(got, want, rel=1e-5, abs_=1e-5)


@PROPS
@given(grouped(), st.sampled_from(["group", "positive"]), st.sampled_from([(2.5, 0.5), (10.0, 2.0), (0.0, 0.5)]))
def test_xrpo_properties(d, mean_over, knobs):
    lam, kappa = knobs
    logprobs = [[-x if x == x else NAN for x in row] for row in d["tok"]]

    def run(d):
        lp = [[-x if x == x else NAN for x in row] for row in d["tok"]]
        batch = make_batch(d["groups"], d["mask"], logprobs=lp)
        adv = call("grpo", f32(d["rewards"]), batch)
        return call("xrpo.novelty_sharpen", adv, batch, lambda_novelty=lam, kappa_clip=kappa, mean_over=mean_over)

    batch = make_batch(d["groups"], d["mask"], logprobs=logprobs)
    adv = call("grpo", f32(d["rewards"]), batch)
    got = run(d)
    check(got, ref_xrpo(adv.tolist(), d["groups"], logprobs, d["mask"], lam=lam, kappa=kappa, mean_over=mean_over),
          d, run)
    assert ((got > 0) == (adv > 0)).all() and (got >= adv).all()  # only a bonus, never a sign flip
    if d["flat"] is not None:  # an all-equal group has A = 0 and stays 0
        idx = members(d["groups"])[d["flat"]]
        if len(idx) > 1:
            assert got[idx].tolist() == [0.0] * len(idx)


@PROPS
@given(grouped(values=nonneg), st.data(), st.sampled_from([(-2.0, 0.7), (-2.5, 0.9), (1.5, 0.3)]))
def test_aspo_properties(d, data, knobs):
    delta, k = knobs
    B = len(d["groups"])
    pos = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 30)), min_size=B, max_size=B))
    extra = data.draw(st.lists(st.integers(0, 30), min_size=B, max_size=B))
    d = dict(d, texts=[("a" * p + "<tool>" + "b" * e) if p is not None else "c" * e for p, e in zip(pos, extra)])

    def run(d):
        batch = make_batch(d["groups"], responses=d["texts"])
        correct = f32([float(x >= 1) for x in d["rewards"]])
        adv = call("grpo", correct, batch)
        return call("aspo.early_call_bonus", adv, correct, batch, marker="<tool>", delta=delta, k=k)

    correct = [float(x >= 1) for x in d["rewards"]]
    adv = call("grpo", f32(correct), make_batch(d["groups"])).tolist()
    got = run(d)
    check(got, ref_aspo(adv, correct, d["groups"], d["texts"], "<tool>", delta=delta, k=k), d, run)
    assert ((got - torch.tensor(adv)).abs() <= k * torch.tensor(adv).abs() + 1e-6).all()
    for idx in members(d["groups"]).values():  # an all-correct (or all-wrong) group stays 0
        if len(idx) > 1 and len({correct[i] for i in idx}) == 1:
            assert got[idx].tolist() == [0.0] * len(idx)

    def run_reward(d):
        correct = f32([float(x >= 1) for x in d["rewards"]])
        return call("aspo.early_call_reward", correct, make_batch(d["groups"], responses=d["texts"]),
                    marker="<tool>", delta=delta, c=1.0)

    check(run_reward(d), ref_aspo_reward(correct, d["groups"], d["texts"], "<tool>", delta=delta, c=1.0), d,
          run_reward)


@PROPS
@given(grouped(values=st.sampled_from([0.0, 0.0, 0.0, 1.0])), st.data(), st.sampled_from([0.2, 0.5, 1.0]),
       st.sampled_from(["truncated", "failed"]), st.sampled_from(["index", "average"]))
def test_r3_properties(d, data, p, eligible, ties):
    B = len(d["groups"])
    d = dict(d, truncated=data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))

    def run(d):
        batch = make_batch(d["groups"], d["mask"], entropy=d["tok"], truncated=T(d["truncated"]))
        return call("r3.entropy_rank_reward", f32(d["rewards"]), batch, p=p, r_max=0.5, eligible=eligible, ties=ties)

    got = run(d)
    want = ref_serr(d["rewards"], d["groups"], d["tok"], d["mask"], d["truncated"], p=p, r_max=0.5,
                    eligible=eligible, ties=ties)
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 0.5).all()
    close(got, want, rel=1e-5, abs_=1e-5)
    pgot = run(permuted(d, d["perm"]))
    if ties == "average":
        close(pgot, got[d["perm"]], rel=1e-5, abs_=1e-5)
    else:  # ties follow batch order: each group keeps the same rewards, perhaps on other responses
        pgroups = [d["groups"][i] for i in d["perm"]]
        for g, idx in members(d["groups"]).items():
            pidx = [i for i, pg in enumerate(pgroups) if pg == g]
            assert sorted(got[idx].tolist()) == pytest.approx(sorted(pgot[pidx].tolist()), abs=1e-6)
    for idx in members(d["groups"]).values():  # a group with a success gets nothing
        if any(d["rewards"][i] > 0 for i in idx):
            assert got[idx].tolist() == [0.0] * len(idx)


# --------------------------------------------------------------------------------------------
# PAR's reference responses: sampled from the frozen initial policy (models.reference +
# rollouts.resample), row for row with the policy's groups
# --------------------------------------------------------------------------------------------


def par_trainer(*sets: str):
    return spec_trainer("par.shape", "train.prompts_per_step=4", "train.eval_size=8", "train.lr=1e-3", *sets)


def test_par_reference_responses_come_from_the_frozen_initial_policy_row_for_row():
    trainer = par_trainer()
    sft = trainer.values["sft"]
    assert sft.frozen and trainer.policy is not sft and not any(p.requires_grad for p in sft.model.parameters())
    initial = [p.detach().clone() for p in sft.model.parameters()]
    for step in range(2):
        metrics = trainer.train_step(step)
    values = trainer.last_values
    groups, refs = values["groups"], values["refs"]
    # same prompts, same groups, same order; as many references per prompt as responses
    assert refs.prompt_ids == groups.prompt_ids and torch.equal(refs.group_index, groups.group_index)
    assert [e.id for e in refs.examples] == [e.id for e in groups.examples]
    assert refs.size == groups.size == 20 and refs.mask.shape[0] == 20
    # the reference rewards are the verifier on those responses, aligned with the groups
    expected = torch.tensor([float(r.strip() == a) for r, a in zip(refs.responses, refs.answers)])
    assert torch.equal(values["ref_correct"].float().cpu(), expected)
    assert metrics["verify/ref_correct/mean"] == pytest.approx(expected.mean().item())
    # the reference never moves; the policy does
    assert all(torch.equal(a, b) for a, b in zip(initial, sft.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.policy.model.parameters()))
    # PAR's reward is the mean sigmoid against the first M = 5 references of the group
    r = values["raw"].float()
    ref = values["ref_correct"].float()
    index = groups.group_index
    want = torch.stack([torch.sigmoid(r[i] - ref[index == index[i]]).mean() for i in range(groups.size)])
    close(values["r"], want.tolist(), rel=1e-6)


def test_resample_is_seeded_by_step_and_needs_equal_groups():
    from shapeflow.runtime.trainer import RunError

    a, b = par_trainer(), par_trainer()
    a.train_step(0)
    b.train_step(0)
    assert a.last_values["refs"].responses == b.last_values["refs"].responses
    groups = a.last_values["groups"]
    uneven = groups.select(torch.arange(groups.size - 1))
    from shapeflow.runtime.trainer import StepContext

    ctx = StepContext(a, 0, node_id="refs")
    with pytest.raises(RunError, match="groups of one size"):
        ctx.resample(a.values["sft"], uneven, engine="generate", max_new_tokens=5, temperature=1.0, top_p=1.0,
                     top_k=0, chat=False)


def test_reference_model_stage_refuses_a_frozen_model():
    from shapeflow.runtime.models import Policy

    with pytest.raises(ValueError, match="the policy the run trains"):
        default_registry()["models.reference"].fn(Policy(None, None, "x", frozen=True))
