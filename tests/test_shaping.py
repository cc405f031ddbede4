"""Worked-example, reference and property tests of the issue-5 shaping stages (shapeflow/stdlib/shaping.py):
G²RPO (catalog A §7), CANON (A §2), ADORA (A §8), GRPO-N (B §3), AdvEvo-MARL's public baseline (A §12).

Expected numbers are the catalogs' worked examples (computed there with the official functions),
numbers worked out by hand (written next to each case), or the straightforward per-group Python
references below: float64 (fractions where an ordering or a comparison matters), independent of
the stages and of shapeflow's helpers. G²RPO's float32 corner cases are checked against a
per-group loop that follows the official compute_1d_ot operation by operation.
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

from shapeflow.stdlib.registry import default_registry  # noqa: E402

PROPS = settings(derandomize=True, max_examples=40, deadline=None, database=None)
NAN = float("nan")
PHI_INV = statistics.NormalDist().inv_cdf


def close(got, want, rel=1e-5, abs_=1e-6):
    """Every entry within rel · max(1, |want|) (and abs_ for values near 0)."""
    got = torch.as_tensor(got, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(want, dtype=torch.float64).flatten().tolist()
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= max(rel * max(1.0, abs(w)), abs_), (got, want)


def catalog(got, want):
    """A catalog number printed to 4 decimals."""
    close(got, want, rel=0, abs_=5.1e-5)


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def members(groups):
    out: dict = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def is_flat(values):
    return len(values) > 1 and len(set(values)) == 1


def with_ctx(name, *inputs, step=0, **params):
    """Call a stateful stage as the executor does, with a fresh state at ``step``."""
    from shapeflow.stdlib.state import StageState

    stg = default_registry()[name]
    return stg.fn(*inputs, **stg.params(**params).model_dump(), state=StageState(dict(stg.state), step=step))


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------


def official_ot(x):
    """The official compute_1d_ot, operation by operation (float32), for one set of values."""
    n = x.shape[0]
    if n <= 1:
        return torch.zeros_like(x)
    sorted_x, indices = torch.sort(x)
    ranks = torch.arange(1, n + 1, dtype=torch.float32)
    q = math.sqrt(2.0) * torch.erfinv(2.0 * ((ranks - 0.5) / n) - 1.0)
    unique, inverse = torch.unique(sorted_x, return_inverse=True)
    if unique.shape[0] < n:
        tied = torch.zeros_like(unique).scatter_add_(0, inverse, q)
        q = (tied / torch.bincount(inverse).to(torch.float32))[inverse]
    out = torch.zeros_like(x)
    out[indices] = q
    return out


def official_g2rpo(rewards, groups, tasks, *, flat_groups="rerank", task_stage=True):
    """Per-task, per-group loops as the official gs_grpo (float32); "zero": flat/one-response
    groups get 0 and are left out of stage 2."""
    r = t32(rewards)
    out = torch.zeros_like(r)
    by_task: dict = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    for idx in by_task.values():
        s = torch.zeros(len(idx))
        keep = []
        for local in members([groups[i] for i in idx]).values():
            vals = [rewards[idx[j]] for j in local]
            lt = torch.tensor(local)
            if flat_groups == "zero" and (is_flat(vals) or len(vals) == 1):
                continue
            s[lt] = official_ot(r[torch.tensor([idx[j] for j in local])])
            keep += local
        if flat_groups == "rerank":
            keep = list(range(len(idx)))
        if not task_stage:
            for j in keep:
                out[idx[j]] = s[j]
            continue
        kt = torch.tensor(sorted(keep), dtype=torch.long)
        a = official_ot(s[kt]) if len(kt) > 1 else torch.zeros(len(kt))
        for j, v in zip(kt.tolist(), a.tolist()):
            out[idx[j]] = v
    return out


def ot64(values):
    """The rank → N(0,1) quantile map in float64, ties averaged (exact comparisons)."""
    n = len(values)
    if n <= 1:
        return [0.0] * n
    ordered = sorted(values)
    q = [PHI_INV((r - 0.5) / n) for r in range(1, n + 1)]
    out = []
    for v in values:
        ranks = [k for k, w in enumerate(ordered) if w == v]
        out.append(sum(q[k] for k in ranks) / len(ranks))
    return out


def ref_g2rpo64(rewards, groups, tasks, *, flat_groups="rerank"):
    out = [0.0] * len(rewards)
    by_task: dict = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    for idx in by_task.values():
        s, keep = {}, []
        for local in members([groups[i] for i in idx]).values():
            ids = [idx[j] for j in local]
            vals = [rewards[i] for i in ids]
            if flat_groups == "zero" and (is_flat(vals) or len(vals) == 1):
                continue
            s.update(zip(ids, ot64(vals)))
            keep += ids
        for i, a in zip(keep, ot64([s[i] for i in keep])):
            out[i] = a
    return out


def ref_canon(rewards, metric, groups, *, variant, mu=1.0, alpha=1.0, beta=0.0, z=1.0):
    """The official loop: per group, Python's stable sorted() by metric, split at n // 2."""
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        order = sorted(idx, key=lambda i: metric[i])
        n = len(order)
        low, high = order[: n // 2], order[n // 2:]
        if n == 1:
            mu_lo = mu_hi = 0.0
        else:
            mu_lo = sum(rewards[i] for i in low) / len(low)
            mu_hi = sum(rewards[i] for i in high) / len(high)
        for i in idx:
            r = rewards[i]
            if i in high:
                inter = (r - alpha * mu_lo + beta) if variant == "entropy" else (alpha * r - mu_lo + beta)
                intra = r - mu_hi
            else:
                inter = (alpha * r - mu_hi - beta) if variant == "entropy" else (r - alpha * mu_hi - beta)
                intra = r - mu_lo
            out[i] = (mu * inter + (1 - mu) * intra) / z
    return out


def ref_adora_weight(rewards, lengths, groups, *, c, lmax, lam=0.1, convention="llm"):
    w = [1.0] * len(rewards)
    for idx in members(groups).values():
        pos = [lengths[i] for i in idx if rewards[i] > c]
        neg = [Fraction(lengths[i]) for i in idx if rewards[i] <= c and lengths[i] < lmax]
        longest = max(pos) if pos else -math.inf
        if neg:
            mean_neg = sum(neg) / len(neg)
        else:
            mean_neg = -math.inf if convention == "llm" else math.inf
        ok = longest > mean_neg or (convention == "vlm" and not pos)
        for i in idx:
            w[i] = 1.0 if ok else lam
    return w


def ref_adora(rewards, lengths, groups, *, c, lmax, lam=0.1, convention="llm", eps=1e-6):
    w = ref_adora_weight(rewards, lengths, groups, c=c, lmax=lmax, lam=lam, convention=convention)
    out = [0.0] * len(rewards)
    for idx in members(groups).values():
        rs = [rewards[i] for i in idx]
        for i in idx:
            if len(idx) == 1:
                a = rewards[i]  # the LLM code keeps a one-response group's raw score
            elif is_flat(rs):
                a = 0.0
            else:
                a = (rewards[i] - statistics.mean(rs)) / (statistics.stdev(rs) + eps)
            out[i] = w[i] * a
    return out


def ref_role_baseline(rewards, groups, roles, *, scope="group", leave_one_out=False, norm_by_std=False, eps=1e-6):
    keys = [(g if scope == "group" else 0, ro) for g, ro in zip(groups, roles)]
    out = [0.0] * len(rewards)
    for idx in members(keys).values():
        rs = [rewards[i] for i in idx]
        if len(idx) == 1 or is_flat(rs):
            continue
        for i in idx:
            if leave_one_out:
                a = rewards[i] - (sum(rs) - rewards[i]) / (len(rs) - 1)
            else:
                a = rewards[i] - sum(rs) / len(rs)
            out[i] = a / (statistics.stdev(rs) + eps) if norm_by_std else a
    return out


# --------------------------------------------------------------------------------------------
# G²RPO: worked examples (catalog A §7, methods/README corner cases)
# --------------------------------------------------------------------------------------------

TWO_TASKS_R = [1, 0, 0, 0, 1, 1, 0, 1, 0.9, 0.1, 0.5, 0.3, 0.8, 0.7, 0.75, 0.2]
TWO_TASKS_G = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
TWO_TASKS_T = ["math"] * 8 + ["grounding"] * 8


def g2rpo_batch(groups, tasks=None, field="problem_type"):
    return make_batch(groups, extra={field: list(tasks)} if tasks is not None else {})


def test_g2rpo_ot_of_one_group():
    got = call("g2rpo.group_ot", t32([1, 0, 0, 0]), make_batch([0] * 4))
    catalog(got, [1.1503, -0.3834, -0.3834, -0.3834])
    close(got, [PHI_INV(7 / 8), *[(PHI_INV(1 / 8) + PHI_INV(3 / 8) + PHI_INV(5 / 8)) / 3] * 3])


def test_g2rpo_two_tasks_two_prompts():
    got = call("g2rpo", t32(TWO_TASKS_R), g2rpo_batch(TWO_TASKS_G, TWO_TASKS_T))
    catalog(got, [1.5341, -0.5111, -0.5111, -0.5111, 0.5111, 0.5111, -1.5341, 0.5111,
                  1.2106, -1.2106, 0.3230, -0.3230, 1.2106, -0.3230, 0.3230, -1.2106])
    close(got, ref_g2rpo64(TWO_TASKS_R, TWO_TASKS_G, TWO_TASKS_T))
    for task in (slice(0, 8), slice(8, 16)):  # each task: N(0,1) quantiles of its ranks, mean 0
        assert abs(got[task].sum().item()) < 1e-5


def test_g2rpo_unfiltered_all_zero_group_is_reranked():
    """Catalog A §7 pitfall: math groups [1,0,0,0] and [0,0,0,0] in one task."""
    r, g = [1, 0, 0, 0, 0, 0, 0, 0], [0] * 4 + [1] * 4
    got = call("g2rpo", t32(r), g2rpo_batch(g))
    catalog(got, [1.5341, -0.9700, -0.9700, -0.9700, 0.3440, 0.3440, 0.3440, 0.3440])
    # the clean reading: the flat group is 0 and the other group is ranked alone
    clean = call("g2rpo", t32(r), g2rpo_batch(g), flat_groups="zero")
    close(clean, ot64([1, 0, 0, 0]) + [0.0] * 4)
    assert clean[4:].tolist() == [0.0] * 4


def test_g2rpo_float32_residue_of_a_flat_group():
    """methods/README: an all-equal group gets about −2.4e-8 after stage 1 (5 responses)."""
    got = call("g2rpo.group_ot", torch.zeros(5), make_batch([0] * 5))
    assert got.tolist() == [-2.3841858265427618e-08] * 5
    assert call("g2rpo.group_ot", torch.zeros(5), make_batch([0] * 5), flat_groups="zero").tolist() == [0.0] * 5
    assert call("g2rpo.group_ot", torch.zeros(4), make_batch([0] * 4)).tolist() == [0.0] * 4
    assert call("g2rpo.group_ot", torch.zeros(8), make_batch([0] * 8)).tolist() == [-1.4901161193847656e-08] * 8


def test_g2rpo_flat_group_reranked_within_its_task():
    """methods/README: +0.1349 in a 4-group, 2-task example (groups of 5)."""
    r = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0.9, 0.1, 0.5, 0.3, 0.7, 0.8, 0.7, 0.75, 0.2, 0.4]
    g = [k for k in range(4) for _ in range(5)]
    t = ["math"] * 10 + ["grounding"] * 10
    got = call("g2rpo", t32(r), g2rpo_batch(g, t))
    catalog(got[5:10], [0.1349] * 5)
    # the flat group's −2.4e-8 ranks just above the other group's zeros: ranks 4..8 of 10
    close(got[5:10], [sum(PHI_INV((k - 0.5) / 10) for k in range(4, 9)) / 5] * 5)
    close(got, official_g2rpo(r, g, t), rel=0, abs_=1e-6)
    clean = call("g2rpo", t32(r), g2rpo_batch(g, t), flat_groups="zero")
    assert clean[5:10].tolist() == [0.0] * 5
    close(clean[:5], ot64(ot64([1, 1, 0, 0, 0])))
    close(clean[10:], got[10:])  # the other task is unchanged


def test_g2rpo_task_stage_off_and_composition():
    b = g2rpo_batch(TWO_TASKS_G, TWO_TASKS_T)
    r = t32(TWO_TASKS_R)
    stage1 = call("g2rpo", r, b, task_stage=False)
    assert torch.equal(stage1, call("g2rpo.group_ot", r, b))
    assert torch.equal(call("g2rpo", r, b), call("g2rpo.task_ot", stage1, b))
    # gs_gdpo: stage 1 on each component, summed, then stage 2
    fmt = t32([1, 1, 0, 1] * 4)
    got = call("g2rpo.task_ot", call("g2rpo.group_ot", r, b) + call("g2rpo.group_ot", fmt, b), b)
    s = [a + f for a, f in zip(
        [v for idx in members(TWO_TASKS_G).values() for v in ot64([TWO_TASKS_R[i] for i in idx])],
        [v for _ in range(4) for v in ot64([1, 1, 0, 1])])]
    want = [v for task in (range(0, 8), range(8, 16)) for v in ot64([s[i] for i in task])]
    close(got, want)


def test_g2rpo_task_labels_from_records_and_examples(tmp_path):
    from shapeflow.runtime.replay import build_batch, read_records
    from shapeflow.stdlib.tasks import Example

    # a recorded rollout: extra.problem_type on each line
    lines = [
        f'{{"prompt_id": {g}, "length": 2, "extra": {{"problem_type": "{t}"}}}}'
        for g, t in zip(TWO_TASKS_G, TWO_TASKS_T)
    ]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    batch = build_batch(read_records(path), set())
    want = call("g2rpo", t32(TWO_TASKS_R), g2rpo_batch(TWO_TASKS_G, TWO_TASKS_T))
    assert torch.equal(call("g2rpo", t32(TWO_TASKS_R), batch), want)
    # the live runtime: the example's record (tasks.jsonl keeps the whole JSON line as meta)
    examples = [Example(f"p{g}", "q", "a", {"problem_type": t}) for g, t in zip(TWO_TASKS_G, TWO_TASKS_T)]
    assert torch.equal(call("g2rpo", t32(TWO_TASKS_R), make_batch(TWO_TASKS_G, examples=examples)), want)
    # nested field, and no label at all: one task ("default"), as the code without problem_type
    nested = [Example(f"p{g}", "q", "a", {"metadata": {"kind": t}}) for g, t in zip(TWO_TASKS_G, TWO_TASKS_T)]
    assert torch.equal(call("g2rpo", t32(TWO_TASKS_R), make_batch(TWO_TASKS_G, examples=nested),
                            task_field="metadata.kind"), want)
    one_task = official_g2rpo(TWO_TASKS_R, TWO_TASKS_G, ["default"] * 16)
    close(call("g2rpo", t32(TWO_TASKS_R), make_batch(TWO_TASKS_G)), one_task, rel=0, abs_=1e-7)
    close(call("g2rpo", t32(TWO_TASKS_R), g2rpo_batch(TWO_TASKS_G, TWO_TASKS_T), task_field=None), one_task,
          rel=0, abs_=1e-7)


def test_g2rpo_segmentation_split_by_data_type():
    r = [1, 0, 0, 0, 1, 1, 0, 1]
    g = [0] * 4 + [1] * 4
    extra = {"problem_type": ["segmentation"] * 8, "data_type": ["image"] * 4 + ["Video"] * 4}
    got = call("g2rpo", t32(r), make_batch(g, extra=extra))
    close(got, official_g2rpo(r, g, ["segmentation/image"] * 4 + ["segmentation/video"] * 4), rel=0, abs_=1e-7)
    assert got[:4].sum().abs().item() < 1e-6  # two tasks of one group each


def test_g2rpo_one_response_task_and_empty_batch():
    got = call("g2rpo", t32([0.3, 1, 0]), g2rpo_batch([0, 1, 1], ["a", "b", "b"]))
    assert got[0].item() == 0.0  # a task of one response
    close(got[1:], [PHI_INV(0.75), PHI_INV(0.25)])
    empty = make_batch([], torch.zeros(0, 1))
    assert call("g2rpo", torch.zeros(0), empty).numel() == 0


def test_g2rpo_length_envelope():
    got = call("g2rpo.length_envelope", t32([5, 10, 15, 20, 30, 40, 45, 50, 55]),
               min_start=10.0, peak_start=20.0, peak_end=40.0, max_end=50.0)
    assert got.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    # a degenerate envelope (a = b, c = d) is a box, with no division by zero
    got = call("g2rpo.length_envelope", t32([9, 10, 12, 14, 15]), min_start=10.0, peak_start=10.0, peak_end=14.0,
               max_end=14.0)
    assert got.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="min_start <= peak_start"):
        default_registry()["g2rpo.length_envelope"].params(min_start=5.0, peak_start=4.0, peak_end=6.0, max_end=7.0)


@pytest.mark.parametrize("h, want", [(0.1, 0.0020), (0.4, 0.0), (0.75, 0.0030)])
def test_g2rpo_entropy_band_catalog(h, want):
    batch = make_batch([0, 0], [[1, 1, 1], [1, 1, 0]], policy_logprobs=[[-h] * 3, [-h, -h, NAN]])
    close(call("g2rpo.entropy_band", batch), [want], rel=1e-5, abs_=1e-9)


def test_g2rpo_entropy_band_per_task_and_gradient():
    logp = torch.tensor([[-0.9, -0.9], [-0.1, -0.3], [-0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = [[1, 1], [1, 1], [1, 0]]
    batch = make_batch([0, 1, 2], mask, policy_logprobs=logp, extra={"task_type": ["a", "b", "b"]})
    loss = call("g2rpo.entropy_band", batch)
    # task a: Ĥ = 0.9 → 0.3 over; task b: Ĥ = (0.1 + 0.3 + 0.5)/3 = 0.3 → inside the band
    close(loss, [0.02 * 0.3])
    loss.backward()
    close(logp.grad, [[-0.01, -0.01], [0, 0], [0, 0]])
    # seq aggregation: task b = mean(0.2, 0.5) = 0.35; a single task: (0.9·2 + 0.9)/5 = 0.54 → 0
    close(call("g2rpo.entropy_band", batch, agg="seq"), [0.006])
    close(call("g2rpo.entropy_band", batch, task_field=None), [0.0])


# --------------------------------------------------------------------------------------------
# G²RPO: references and properties
# --------------------------------------------------------------------------------------------

quarters = st.integers(-4, 8).map(lambda k: k / 4)


@st.composite
def labelled_batch(draw, *, values=quarters, distinct=False, max_group=6):
    """(rewards, groups, tasks, perm): up to 5 groups, each with a task label."""
    sizes = draw(st.lists(st.integers(1, max_group), min_size=1, max_size=5))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    task_of = draw(st.lists(st.sampled_from(["a", "b"]), min_size=len(sizes), max_size=len(sizes)))
    if distinct:  # distinct rewards within each group: float32 and float64 agree on every tie
        rewards = [v for n in sizes for v in draw(st.permutations(list(range(n))))]
        rewards = [r / 4 for r in rewards]
    else:
        rewards = draw(st.lists(values, min_size=len(groups), max_size=len(groups)))
        if draw(st.booleans()):  # one group all equal
            g = draw(st.integers(0, len(sizes) - 1))
            v = draw(values)
            rewards = [v if gi == g else r for r, gi in zip(rewards, groups)]
    order = draw(st.permutations(range(len(groups))))
    perm = draw(st.permutations(range(len(groups))))
    rewards, groups = [rewards[i] for i in order], [groups[i] for i in order]
    return rewards, groups, [task_of[g] for g in groups], perm


def _permuted(perm, *lists):
    return [[x[i] for i in perm] for x in lists]


@PROPS
@given(labelled_batch(), st.sampled_from(["rerank", "zero"]), st.booleans())
def test_g2rpo_matches_the_official_loops(data, flat_groups, task_stage):
    rewards, groups, tasks, perm = data
    adv = call("g2rpo", t32(rewards), g2rpo_batch(groups, tasks), flat_groups=flat_groups, task_stage=task_stage)
    assert torch.isfinite(adv).all()
    want = official_g2rpo(rewards, groups, tasks, flat_groups=flat_groups, task_stage=task_stage)
    close(adv, want, rel=0, abs_=1e-6)
    prewards, pgroups, ptasks = _permuted(perm, rewards, groups, tasks)
    padv = call("g2rpo", t32(prewards), g2rpo_batch(pgroups, ptasks), flat_groups=flat_groups, task_stage=task_stage)
    assert torch.equal(padv, adv[perm])  # permuting the responses permutes the advantages, bit for bit
    for idx in members(groups).values():  # an all-equal group: one value (exactly 0 when "zero")
        if is_flat([rewards[i] for i in idx]):
            vals = {adv[i].item() for i in idx}
            assert len(vals) == 1 and (flat_groups == "rerank" or vals == {0.0})
    if task_stage:
        for t in set(tasks):  # each task's advantages are quantiles of its ranks: they sum to ~0
            assert abs(sum(adv[i].item() for i, ti in enumerate(tasks) if ti == t)) < 1e-5


@PROPS
@given(labelled_batch(distinct=True), st.sampled_from(["rerank", "zero"]))
def test_g2rpo_matches_the_float64_reference(data, flat_groups):
    rewards, groups, tasks, _ = data
    adv = call("g2rpo", t32(rewards), g2rpo_batch(groups, tasks), flat_groups=flat_groups)
    close(adv, ref_g2rpo64(rewards, groups, tasks, flat_groups=flat_groups), abs_=1e-5)


@PROPS
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.data())
def test_normal_scores_is_the_official_ot_bit_for_bit(sizes, data):
    """Large tie runs too: the tie sums accumulate in rank order, as torch.scatter_add_ there."""
    from shapeflow.stdlib.shaping import normal_scores

    seg = [s for s, n in enumerate(sizes) for _ in range(n)]
    x = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, -2.0, 1e-8]), min_size=len(seg), max_size=len(seg)))
    got = normal_scores(t32(x), torch.tensor(seg), len(sizes))
    want = torch.zeros(len(x))
    for idx in members(seg).values():
        want[torch.tensor(idx)] = official_ot(t32([x[i] for i in idx]))
    assert torch.equal(got, want)


@PROPS
@given(st.lists(st.sampled_from([0.0, 3.0, 10.0, 12.5, 20.0, 35.0, 40.0, 41.0, 50.0, 60.0]), min_size=1, max_size=8))
def test_length_envelope_reference(lengths):
    a, b, c, d = 10.0, 20.0, 40.0, 50.0

    def ref(n):
        if n < a or n > d:
            return 0.0
        if n < b:
            return (n - a) / (b - a)
        return 1.0 if n <= c else 1.0 - (n - c) / (d - c)

    got = call("g2rpo.length_envelope", t32(lengths), min_start=a, peak_start=b, peak_end=c, max_end=d)
    close(got, [ref(n) for n in lengths])


# --------------------------------------------------------------------------------------------
# CANON: worked examples (catalog A §2) and the code's corner cases (methods/README)
# --------------------------------------------------------------------------------------------

CANON_R = [1, 0, 1, 1, 0, 0]
CANON_M = [0.9, 0.2, 0.8, 0.1, 0.7, 0.3]


@pytest.mark.parametrize("params, want", [
    ({"mu": 1.0}, [0.6667, -0.6667, 0.6667, 0.3333, -0.3333, -0.6667]),
    ({"mu": 0.5}, [0.5, -0.5, 0.5, 0.5, -0.5, -0.5]),
    ({"mu": 0.0}, [0.3333, -0.3333, 0.3333, 0.6667, -0.6667, -0.3333]),
    ({"mu": 1.0, "alpha": 1.2}, [0.6, -0.6667, 0.6, 0.5333, -0.4, -0.6667]),
])
def test_canon_entropy_catalog(params, want):
    got = with_ctx("canon.entropy", t32(CANON_R), make_batch([0] * 6), t32(CANON_M), **params)
    catalog(got, want)
    close(got, ref_canon(CANON_R, CANON_M, [0] * 6, variant="entropy", **params))


def test_canon_entropy_from_token_entropies_and_normaliser():
    # the mean token entropy of each response (padding, even NaN, ignored) is the metric
    ent = [[0.9, 0.9, NAN], [0.1, 0.3, 0.2], [0.8, NAN, NAN], [0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.3, 0.3, NAN]]
    mask = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
    batch = make_batch([0] * 6, mask)
    got = with_ctx("canon.entropy", t32(CANON_R), batch, t32(ent), normalizer=8192.0)
    catalog(got * 8192, [0.6667, -0.6667, 0.6667, 0.3333, -0.3333, -0.6667])
    close(got[0], [8.14e-05], rel=1e-3)


def test_canon_length_catalog():
    got = with_ctx("canon.length", t32(CANON_R), make_batch([0] * 6), t32([6, 3, 5, 2, 8, 4]), mu=1.0, alpha=1.2)
    catalog(got, [0.8667, -0.8, 0.8667, 0.2, -0.3333, -0.8])


def test_canon_dr_grpo_identity():
    r = [0.2, 0.9, 0, 0.5, 1, 1, 0, 0.3]
    m = [0.5, 0.1, 0.7, 0.2, 0.9, 0.3, 0.4, 0.6]
    g = [0] * 4 + [1] * 4  # even sizes: the two halves weigh alike
    for name in ("canon.entropy", "canon.length"):
        got = with_ctx(name, t32(r), make_batch(g), t32(m), mu=0.5, normalizer=4.0)
        close(got, [(r[i] - statistics.mean(r[j] for j in members(g)[g[i]])) / 4 for i in range(8)])


def test_canon_five_split_two_low_three_high():
    got = with_ctx("canon.entropy", t32([1, 1, 0, 0, 0]), make_batch([0] * 5), t32([0.1, 0.2, 0.3, 0.4, 0.5]))
    # C⁻ = {0, 1} (μ⁻ = 1), C⁺ = {2, 3, 4} (μ⁺ = 0); a 3 low / 2 high split would differ
    close(got, [1, 1, -1, -1, -1])


def test_canon_ties_keep_batch_order():
    # all metrics tied: the first two in batch order are the low side
    got = with_ctx("canon.entropy", t32([1, 1, 0, 0]), make_batch([0] * 4), t32([0.5] * 4), alpha=1.2)
    close(got, [1.2, 1.2, -1.2, -1.2])  # low = {0, 1}: α·1 − 0; high = {2, 3}: 0 − α·1
    got = with_ctx("canon.entropy", t32([0, 0, 1, 1]), make_batch([0] * 4), t32([0.5] * 4), alpha=1.2)
    close(got, [-1.0, -1.0, 1.0, 1.0])  # low = {0, 1} again: 0 − μ⁺; high: 1 − α·0


def test_canon_all_equal_group_is_zero_only_with_alpha_one_beta_zero():
    flat = t32([1, 1, 1, 1])
    batch, m = make_batch([0] * 4), t32([0.4, 0.1, 0.3, 0.2])
    for name in ("canon.entropy", "canon.length"):
        assert with_ctx(name, flat, batch, m, mu=0.7).abs().max().item() == 0.0
        assert with_ctx(name, flat, batch, m, mu=0.0, alpha=1.5, beta=0.3).abs().max().item() == 0.0  # pure intra
    # high = {0, 2} (metric 0.4, 0.3): 1 − 1.2·1; low = {1, 3}: 1.2·1 − 1
    close(with_ctx("canon.entropy", flat, batch, m, alpha=1.2), [-0.2, 0.2, -0.2, 0.2])
    close(with_ctx("canon.entropy", flat, batch, m, beta=0.1), [0.1, -0.1, 0.1, -0.1])


def test_canon_one_response_group_is_not_zero():
    r, mu, alpha, beta, z = 0.7, 0.5, 1.3, 0.2, 2.0
    params = dict(mu=mu, alpha=alpha, beta=beta, normalizer=z)
    got = with_ctx("canon.entropy", t32([r]), make_batch([0]), t32([0.4]), **params)
    close(got, [(r + mu * beta) / z])
    got = with_ctx("canon.length", t32([r]), make_batch([0]), t32([3]), **params)
    close(got, [(mu * alpha * r + (1 - mu) * r + mu * beta) / z])


def test_canon_schedule_function():
    from shapeflow.stdlib.shaping import canon_schedule, cosine_annealing_with_restart

    f = [cosine_annealing_with_restart(t, max_value=0.6, min_value=0.0) for t in (0, 29, 30, 50, 69, 70, 110, 210)]
    close(f, [0.02, 0.6, 0.6, 0.3, 0.3 * (1 + math.cos(math.pi * 39 / 40)), 0.6, 0.6, 0.3])
    w = [canon_schedule("cosine_restart", step=s) for s in (1, 30, 50, 70)]
    close(w, [0.96, 0.4, 0.7, 0.4])
    close([canon_schedule("cosine_restart_r", step=s) for s in (0, 50, 69)],
          [1 / 30, 0.7, 0.4 + 0.3 * (1 + math.cos(math.pi * 39 / 40))])
    assert canon_schedule("annealed", mean_reward=0.25) == 0.25
    assert canon_schedule("fixed", mu=0.3) == 0.3
    with pytest.raises(ValueError, match="needs the training step"):
        canon_schedule("cosine_restart")
    with pytest.raises(ValueError, match="mean reward"):
        canon_schedule("annealed")
    with pytest.raises(ValueError, match="at least cycles"):
        default_registry()["canon.entropy"].params(total_steps=31, warmup_steps=30, cycles=3)


def test_canon_schedules_in_the_stage():
    from shapeflow.stdlib.shaping import canon_schedule

    r, m, g = t32(CANON_R + [1, 0, 0]), t32(CANON_M + [0.3, 0.2, 0.1]), make_batch([0] * 6 + [1] * 3)
    for step in (0, 29, 49, 69):  # the runtime's step is 0-based; verl's global_steps starts at 1
        for name in ("cosine_restart", "cosine_restart_r"):
            got = with_ctx("canon.entropy", r, g, m, schedule=name, step=step)
            want = with_ctx("canon.entropy", r, g, m, mu=canon_schedule(name, step=step + 1))
            close(got, want)
    mean = sum(CANON_R + [1, 0, 0]) / 9
    close(with_ctx("canon.entropy", r, g, m, schedule="annealed", step=7),
          ref_canon(CANON_R + [1, 0, 0], CANON_M + [0.3, 0.2, 0.1], [0] * 6 + [1] * 3, variant="entropy", mu=mean))


@st.composite
def canon_batch(draw, distinct=False):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    b = len(groups)
    rewards = draw(st.lists(quarters, min_size=b, max_size=b))
    t = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    if distinct:
        tok = [[float(i * 8 + j + 1) for j in range(t)] for i in draw(st.permutations(range(b)))]
        lengths = [max(1, n) for n in lengths]
    else:
        tok = draw(st.lists(st.lists(st.integers(0, 3).map(float), min_size=t, max_size=t), min_size=b, max_size=b))
    mask = [[1 if j < n else 0 for j in range(t)] for n in lengths]
    tok = [[v if mk else NAN for v, mk in zip(row, mrow)] for row, mrow in zip(tok, mask)]
    perm = draw(st.permutations(range(b)))
    return rewards, groups, mask, tok, perm


@PROPS
@given(canon_batch(), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([1.0, 1.2]), st.sampled_from([0.0, 0.1]),
       st.sampled_from(["entropy", "length"]))
def test_canon_matches_the_reference(data, mu, alpha, beta, variant):
    rewards, groups, mask, tok, _ = data
    batch = make_batch(groups, mask)
    lengths = [sum(m) for m in mask]
    if variant == "entropy":
        metric = [Fraction(sum(int(v) for v, mk in zip(row, mrow) if mk), max(sum(mrow), 1))
                  for row, mrow in zip(tok, mask)]
        adv = with_ctx("canon.entropy", t32(rewards), batch, t32(tok), mu=mu, alpha=alpha, beta=beta, normalizer=2.0)
    else:
        metric = lengths
        adv = with_ctx("canon.length", t32(rewards), batch, t32(lengths), mu=mu, alpha=alpha, beta=beta,
                       normalizer=2.0)
    assert torch.isfinite(adv).all()
    close(adv, ref_canon(rewards, metric, groups, variant=variant, mu=mu, alpha=alpha, beta=beta, z=2.0), abs_=1e-5)
    if alpha == 1.0 and beta == 0.0:
        for idx in members(groups).values():
            if is_flat([rewards[i] for i in idx]):
                assert all(adv[i].item() == 0.0 for i in idx)


@PROPS
@given(canon_batch(distinct=True), st.sampled_from(["entropy", "length"]))
def test_canon_permuting_responses_permutes_the_advantages(data, variant):
    rewards, groups, mask, tok, perm = data
    if variant == "entropy":
        name, metric = "canon.entropy", tok
    else:
        name, metric = "canon.length", [float(i) for i in range(len(rewards))]
    prew, pgroups, pmask, pmetric = _permuted(perm, rewards, groups, mask, metric)
    adv = with_ctx(name, t32(rewards), make_batch(groups, mask), t32(metric), alpha=1.3, beta=0.1)
    padv = with_ctx(name, t32(prew), make_batch(pgroups, pmask), t32(pmetric), alpha=1.3, beta=0.1)
    close(padv, adv[perm])


# --------------------------------------------------------------------------------------------
# ADORA (catalog A §8)
# --------------------------------------------------------------------------------------------


def test_adora_llm_catalog():
    r = [3, -0.5, 3, -0.5, 3, -0.5, -0.5, 3]
    lengths = [1200, 800, 900, 700, 400, 900, 1000, 500]
    got = call("adora", t32(r), make_batch([0] * 4 + [1] * 4), t32(lengths), correct_above=1.01)
    catalog(got, [0.8660, -0.8660, 0.8660, -0.8660, 0.0866, -0.0866, -0.0866, 0.0866])
    close(got, ref_adora(r, lengths, [0] * 4 + [1] * 4, c=1.01, lmax=4054))


def test_adora_vlm_weights_catalog():
    r = [1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    lengths = [1200, 800, 900, 700, 400, 900, 1000, 500, 300, 600, 200, 100]
    got = call("adora.weight", t32(r), make_batch([0] * 4 + [1] * 4 + [2] * 4), t32(lengths), correct_above=0.5,
               convention="vlm")
    close(got, [1.0] * 4 + [0.1] * 4 + [1.0] * 4)


def test_adora_empty_set_conventions():
    g = [0, 0, 1, 1]
    r, lengths = t32([1, 1, 0, 0]), t32([5, 6, 7, 8])  # group 0 all correct, group 1 all wrong
    close(call("adora.weight", r, make_batch(g), lengths, correct_above=0.5), [1, 1, 0.1, 0.1])  # llm
    close(call("adora.weight", r, make_batch(g), lengths, correct_above=0.5, convention="vlm"), [0.1, 0.1, 1, 1])


def test_adora_one_response_group_keeps_its_raw_score():
    got = call("adora", t32([3.0, -0.5]), make_batch([0, 1]), t32([100, 100]), correct_above=1.01)
    close(got, [3.0, -0.05])  # correct: weight 1, raw; wrong alone: raw × λ (no correct response)


def test_adora_length_threshold_flips_the_verdict():
    r, g = t32([1, 0, 0]), make_batch([0, 0, 0])
    lengths = t32([500, 300, 5000])  # the 5000-token wrong answer (truncated) is left out of the mean
    close(call("adora.weight", r, g, lengths, correct_above=0.5), [1, 1, 1])  # 500 > 300
    close(call("adora.weight", r, g, lengths, correct_above=0.5, max_length=8192), [0.1] * 3)  # 500 < 2650
    close(call("adora.weight", r, g, lengths, correct_above=0.5, lam=2.5, max_length=8192), [2.5] * 3)


def test_adora_weights_any_estimator_in_a_spec(tmp_path):
    from shapeflow.compiler.pipeline import compile_spec

    spec = """\
spec adora_rloo {
  title = "ADORA on RLOO"
  cite  = "arXiv:2602.10019"
}
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = tasks.arithmetic(digits = 2)
rollout   groups  = rollouts.sample(policy, prompts, n = 8)
verify    correct = verifiers.exact_answer(groups)
advantage adv     = rloo(correct, groups) * adora.weight(correct, groups, signals.length(groups), correct_above = 0.5)
                    |> negative_only()
objective loss    = losses.ppo_clip(adv, groups)
"""
    path = tmp_path / "adora_rloo.shape"
    path.write_text(spec)
    compiled = compile_spec(Path(path))
    assert compiled.diagnostics == []
    assert str(compiled.program.nodes[compiled.program.bindings["adv"]].type) == "Advantage[seq]"


@st.composite
def adora_batch(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    b = len(groups)
    rewards = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0, -0.5]), min_size=b, max_size=b))
    lengths = draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))
    perm = draw(st.permutations(range(b)))
    return rewards, groups, lengths, perm


@PROPS
@given(adora_batch(), st.sampled_from(["llm", "vlm"]), st.sampled_from([0.5, 1.01]), st.sampled_from([10, 13]))
def test_adora_matches_the_reference(data, convention, c, lmax):
    rewards, groups, lengths, perm = data
    params = dict(correct_above=c, max_length=lmax, convention=convention)
    adv = call("adora", t32(rewards), make_batch(groups), t32(lengths), **params)
    assert torch.isfinite(adv).all()
    close(adv, ref_adora(rewards, lengths, groups, c=c, lmax=lmax, convention=convention), abs_=1e-5)
    w = call("adora.weight", t32(rewards), make_batch(groups), t32(lengths), **params)
    close(w, ref_adora_weight(rewards, lengths, groups, c=c, lmax=lmax, convention=convention))
    prew, pgroups, plen = _permuted(perm, rewards, groups, lengths)
    close(call("adora", t32(prew), make_batch(pgroups), t32(plen), **params), adv[perm], abs_=1e-6)
    for idx in members(groups).values():
        if is_flat([rewards[i] for i in idx]):
            assert all(adv[i].item() == 0.0 for i in idx)


# --------------------------------------------------------------------------------------------
# GRPO-N (catalog B §3)
# --------------------------------------------------------------------------------------------


def test_negative_only_catalog():
    adv = call("grpo", t32([1, 0, 0, 1, 0.2, 0.9, 0, 0.5]), make_batch([0] * 4 + [1] * 4))
    got = call("negative_only", adv)
    close(got, [0, -0.866, -0.866, 0, -0.511, 0, -1.022, 0], rel=0, abs_=5.1e-4)
    assert (got <= 0).all() and got[[0, 3, 5, 7]].tolist() == [0.0] * 4
    close(got, torch.clamp(adv, max=0))


@PROPS
@given(st.lists(st.lists(st.integers(-4, 4).map(lambda k: k / 4), min_size=3, max_size=3), min_size=1, max_size=5),
       st.data())
def test_negative_only_token_level_properties(rows, data):
    mask = data.draw(st.lists(st.lists(st.integers(0, 1), min_size=3, max_size=3), min_size=len(rows),
                              max_size=len(rows)))
    adv = torch.tensor([[v if m else 0.0 for v, m in zip(r, mr)] for r, mr in zip(rows, mask)])
    got = call("negative_only", adv)
    assert got.shape == adv.shape and torch.isfinite(got).all()
    assert (got[torch.tensor(mask) == 0] == 0).all()  # padding stays 0
    assert torch.equal(got, torch.where(adv < 0, adv, torch.zeros_like(adv)))
    perm = data.draw(st.permutations(range(len(rows))))
    assert torch.equal(call("negative_only", adv[perm]), got[perm])


# --------------------------------------------------------------------------------------------
# AdvEvo-MARL public baseline (catalog A §12)
# --------------------------------------------------------------------------------------------


def test_role_baseline_catalog():
    roles = ["defender"] * 3 + ["attacker"] * 2
    got = call("advevo_marl.role_baseline", t32([1, 0, 1, 0, 1]), make_batch([0] * 5, extra={"role": roles}))
    catalog(got, [0.3333, -0.6667, 0.3333, -0.5, 0.5])


def test_role_baseline_scope_and_options():
    r = [1, 0, 1, 0, 1, 0, 0, 1]
    g = [0] * 4 + [1] * 4
    roles = ["d", "d", "a", "a", "d", "d", "a", "a"]
    batch = make_batch(g, extra={"role": roles})
    close(call("advevo_marl.role_baseline", t32(r), batch), ref_role_baseline(r, g, roles))
    close(call("advevo_marl.role_baseline", t32(r), batch, scope="batch"),
          ref_role_baseline(r, g, roles, scope="batch"))
    # defenders of the batch: [1, 0, 1, 0] → b = 0.5; leave-one-out: 1 − 1/3 = 0.6667
    close(call("advevo_marl.role_baseline", t32(r), batch, scope="batch", leave_one_out=True)[:2], [2 / 3, -2 / 3])


def test_role_baseline_needs_a_recorded_role():
    from shapeflow.stdlib.tasks import Example

    with pytest.raises(ValueError, match="no response records a role 'role'"):
        call("advevo_marl.role_baseline", t32([1, 0]), make_batch([0, 0]))
    with pytest.raises(ValueError, match="some response records"):
        call("advevo_marl.role_baseline", t32([1, 0]), make_batch([0, 0], extra={"role": ["a", None]}))
    # shared: single-agent data is one role, the group-mean baseline
    close(call("advevo_marl.role_baseline", t32([1, 0, 0, 0]), make_batch([0] * 4), missing_role="shared"),
          [0.75, -0.25, -0.25, -0.25])
    # the role may come from the task example's record
    examples = [Example("p", "q", "a", {"agent": {"role": ro}}) for ro in ["x", "x", "y", "y"]]
    close(call("advevo_marl.role_baseline", t32([1, 0, 0, 1]), make_batch([0] * 4, examples=examples),
               role_field="agent.role"), [0.5, -0.5, -0.5, 0.5])


@st.composite
def role_batch(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    b = len(groups)
    rewards = draw(st.lists(quarters, min_size=b, max_size=b))
    roles = draw(st.lists(st.sampled_from(["att", "def", "judge"]), min_size=b, max_size=b))
    return rewards, groups, roles, draw(st.permutations(range(b)))


@PROPS
@given(role_batch(), st.sampled_from(["group", "batch"]), st.booleans(), st.booleans())
def test_role_baseline_matches_the_reference(data, scope, leave_one_out, norm_by_std):
    rewards, groups, roles, perm = data
    params = dict(scope=scope, leave_one_out=leave_one_out, norm_by_std=norm_by_std)
    adv = call("advevo_marl.role_baseline", t32(rewards), make_batch(groups, extra={"role": roles}), **params)
    assert torch.isfinite(adv).all()
    close(adv, ref_role_baseline(rewards, groups, roles, **params), abs_=1e-5)
    prew, pgroups, proles = _permuted(perm, rewards, groups, roles)
    padv = call("advevo_marl.role_baseline", t32(prew), make_batch(pgroups, extra={"role": proles}), **params)
    close(padv, adv[perm], abs_=1e-6)


# --------------------------------------------------------------------------------------------
# docs, lazy torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, texts", [
    ("g2rpo", ["stage 2:  A_i = OT_τ(s)_i", "flat_groups: one of 'rerank', 'zero' = 'rerank'",
               "task_field: string or none = 'problem_type'", "task_stage: boolean = true", "arXiv:2604.08539",
               "+0.1349"]),
    ("g2rpo.entropy_band", ["L     = c · Σ_τ reg_τ", "h_low: number = 0.2", "h_high: number = 0.6",
                            "coef: number = 0.02", "policy_logprobs"]),
    ("g2rpo.length_envelope", ["min_start: number = required", "max_end"]),
    ("canon.entropy", ["A_o = [ w·A_inter + (1 − w)·A_intra ] / Z", "mu: number = 1.0  (>= 0 and <= 1)",
                       "alpha: number = 1.0", "beta: number = 0.0", "normalizer: number = 1.0  (> 0)",
                       "schedule: one of 'fixed', 'annealed', 'cosine_restart', 'cosine_restart_r' = 'fixed'",
                       "total_steps: integer = 150", "warmup_steps: integer = 30", "cycles: integer = 3",
                       "arXiv:2509.23962"]),
    ("canon.length", ["o ∈ C⁺ (long):   A_inter = α·R_o − μ⁻ + β", "2 low, 3 high"]),
    ("adora", ["A'_i = w_g · A_i", "correct_above: number = required", "lam: number = 0.1",
               "convention: one of 'llm', 'vlm' = 'llm'", "max_length: integer or none = none",
               "eps: number = 1e-06", "arXiv:2602.10019"]),
    ("negative_only", ["A^N = min(A, 0)", "Reconstructed from the paper's description", "arXiv:2510.04028"]),
    ("advevo_marl.role_baseline", ["b_F = mean_{a' ∈ F} R_{a'}", "Reconstructed from the paper's description",
                                   "role_field: string = 'role'", "scope: one of 'group', 'batch' = 'group'",
                                   "arXiv:2510.01586"]),
])
def test_stage_doc_page(name, texts, capsys):
    stage_page_shows(name, texts, capsys)


def test_importing_the_stages_does_not_import_torch():
    code = "import sys, shapeflow.stdlib.shaping; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
