"""Worked-example, reference, state and property tests of the stateful shaping stages
(shapeflow/stdlib/shaping_state.py): MSSR's Beta value tracker and entropy shaping, VERL's
effective-rank bonus.

The worked examples are catalog A §3 and §6. VERL's metrics are checked against an independent
float64 SVD reference written here (numpy); the catalog's toy hidden states are not published,
so its ER / ERV / ERA values enter only through the bonus arithmetic (ψ, d, A'), which is
asserted from the metric values and baselines the catalog gives. Every corner case of the
official code (methods/README.md) is tested in its default and in its option.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import call, make_batch, stage_page_shows, spec_trainer  # noqa: E402

from shapeflow.stdlib import shaping_state as ss  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402
from shapeflow.stdlib.state import StageState  # noqa: E402

PROPS = settings(derandomize=True, max_examples=25, deadline=None, database=None)


def close(got, want, tol: float) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               atol=tol, rtol=0)


def fresh(name: str) -> StageState:
    return StageState(dict(default_registry()[name].state), owner=name)


# --------------------------------------------------------------------------------------------
# MSSR: the ρ mapping
# --------------------------------------------------------------------------------------------


def test_rho_worked_example_and_the_code_mapping():
    # catalog A §3: history [0.004, 0.006], target 0.01 → k̄ = 0.005 → 0.875 + 0.5·0.085
    assert ss.mssr_rho([0.004, 0.006]) == pytest.approx(0.9175, abs=1e-12)
    assert ss.mssr_rho([]) == pytest.approx((0.875 + 0.96) / 2)  # no history: the middle
    assert ss.mssr_rho([0.002]) == pytest.approx(0.892)
    # discontinuous at the target: just below → near ρ_max, just above → ρ_min
    assert ss.mssr_rho([0.0099]) == pytest.approx(0.95915)
    assert ss.mssr_rho([0.0101]) == pytest.approx(0.875)
    assert ss.mssr_rho([5.0]) == pytest.approx(0.875)
    # lower KL gives lower ρ below the target (the code, against its comment)
    assert ss.mssr_rho([0.001]) < ss.mssr_rho([0.009])
    # only the last `window` values count, the current one last
    assert ss.mssr_rho([100.0] + [0.005] * 10) == pytest.approx(0.9175)
    assert ss.mssr_rho([100.0] + [0.005] * 10, window=11) == pytest.approx(0.875)


def test_rho_decreasing_and_fixed_options():
    assert ss.mssr_rho([0.004, 0.006], mapping="decreasing") == pytest.approx(0.9175)
    assert ss.mssr_rho([0.002], mapping="decreasing") == pytest.approx(0.943)
    assert ss.mssr_rho([0.0099], mapping="decreasing") == pytest.approx(0.87585)
    assert ss.mssr_rho([0.0], mapping="decreasing") == pytest.approx(0.96)
    assert ss.mssr_rho([0.3], mapping="fixed") == pytest.approx(0.9175)
    with pytest.raises(ValueError, match="unknown rho mapping"):
        ss.mssr_rho([0.1], mapping="other")


@PROPS
@given(st.lists(st.floats(0, 10, allow_nan=False), max_size=15), st.sampled_from(["code", "decreasing", "fixed"]))
def test_rho_stays_in_range(history, mapping):
    rho = ss.mssr_rho(history, mapping=mapping)
    assert 0.875 <= rho <= 0.96


@PROPS
@given(st.floats(0, 0.05, allow_nan=False), st.floats(0, 0.05, allow_nan=False))
def test_decreasing_mapping_is_monotone(k1, k2):
    lo, hi = sorted((k1, k2))
    assert ss.mssr_rho([lo], mapping="decreasing") >= ss.mssr_rho([hi], mapping="decreasing")


# --------------------------------------------------------------------------------------------
# MSSR: the worked example (catalog A §3)
# --------------------------------------------------------------------------------------------

PROBS = [[0.5, 0.5, 0.5], [0.3, 0.8, 0.6], [0.7, 0.95, 0.2], [0.5, 0.5, 0.5]]


def k3_inverse(target: float) -> float:
    """Δ with exp(−Δ) + Δ − 1 = target (Newton)."""
    d = math.sqrt(2 * target)
    for _ in range(50):
        d -= (math.exp(-d) + d - 1 - target) / (1 - math.exp(-d))
    return d


def mssr_batch(kl: float = 0.0, probs=PROBS, group_index=(0, 1, 2, 3), mask=None):
    logp = torch.log(torch.tensor(probs, dtype=torch.float64))
    return make_batch(list(group_index), mask, T=len(probs[0]), logprobs=logp, ref_logprobs=logp - k3_inverse(kl)
                      if kl else logp.clone())


def catalog_tracker() -> StageState:
    state = fresh("mssr")
    state["alpha"] = {"p0": 8.0, "p1": 0.0, "p2": 8.0, "p3": 0.0}  # initial outcomes [1, 0, 1, 0], N0 = 8
    state["beta"] = {"p0": 0.0, "p1": 8.0, "p2": 0.0, "p3": 8.0}
    state["kl_history"] = [0.004]
    return state


def tracked(state: StageState, keys=("p0", "p1", "p2", "p3")) -> list[float]:
    return [state["alpha"][k] / (state["alpha"][k] + state["beta"][k]) for k in keys]


def test_mssr_worked_example():
    state = catalog_tracker()
    batch = mssr_batch(kl=0.006)  # this step's KL: every token's k3 is 0.006
    adv = call("mssr", torch.tensor([1.0, 1.0, 0.0, 0.0]), batch, state=state)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([0.0, 1.41421356, -1.41421356, 0.0], abs=1e-6)
    assert state["kl_history"] == pytest.approx([0.004, 0.006], abs=1e-7)  # the current KL entered first
    assert state["rho"] == pytest.approx(0.9175, abs=1e-5)
    assert tracked(state) == pytest.approx([1.0, 0.1199, 0.8801, 0.0], abs=5e-5)
    assert state["beta"]["p1"] == pytest.approx(0.9175 * 8, abs=1e-4) and state["alpha"]["p1"] == 1.0
    # the entropy shaping on top: H = −p log p of the sampled token, ψ = min(0.4·H, |A|/2)
    h = call("mssr.token_entropy", batch)
    assert h[1].tolist() == pytest.approx([0.3612, 0.1785, 0.3065], abs=1e-4)
    out = call("mssr.entropy_shaping", adv, batch, h)
    assert (out[1] - adv[1]).tolist() == pytest.approx([0.1445, 0.0714, 0.1226], abs=1e-4)
    assert (out[2] - adv[2]).tolist() == pytest.approx([0.0999, 0.0195, 0.1288], abs=1e-4)
    assert out[1].tolist() == pytest.approx([1.5587, 1.4856, 1.5368], abs=1e-4)
    assert out[2].tolist() == pytest.approx([-1.3143, -1.3947, -1.2855], abs=1e-4)
    assert out[0].tolist() == [0.0, 0.0, 0.0] and out[3].tolist() == [0.0, 0.0, 0.0]


def test_mssr_entropy_source_is_the_input():
    """The full-vocabulary entropy (signals.entropy) is used as given; the proxy from logprobs."""
    batch = mssr_batch()
    batch.entropy = torch.full((4, 3), 2.0)
    full = call("signals.entropy", batch)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5])
    out = call("mssr.entropy_shaping", adv, batch, full, alpha=0.1, kappa=4.0)
    # ψ = min(0.1·2, |A|/4): 0.2 capped at 0.25, 0.25, 0, 0.125
    assert out[:, 0].tolist() == pytest.approx([1.2, -0.8, 0.0, 0.625])


# --------------------------------------------------------------------------------------------
# MSSR: the code's corner cases, default and option
# --------------------------------------------------------------------------------------------


def test_values_come_back_as_float32():
    state = fresh("mssr")
    state["alpha"], state["beta"] = {"p0": 1.0}, {"p0": 2.0}
    adv = call("mssr", torch.tensor([1.0]), mssr_batch(probs=[[0.5]], group_index=[0]), state=state)
    assert adv.item() == (torch.tensor(1.0) - torch.tensor(1 / 3, dtype=torch.float32)).item()
    assert adv.item() != 1 - 1 / 3  # not the float64 value


def test_population_variance_clamped_at_eps_and_a_single_response():
    probs = [[0.5]] * 2
    adv = call("mssr", torch.tensor([0.5, 1.5]), mssr_batch(probs=probs, group_index=[0, 1]))
    assert adv.tolist() == pytest.approx([-1.0, 1.0])  # population std 0.5 (sample std would give ±0.7071)
    adv = call("mssr", torch.tensor([0.5, 0.5001]), mssr_batch(probs=probs, group_index=[0, 1]))
    assert adv.tolist() == pytest.approx([-0.05, 0.05], rel=1e-3)  # Var 2.5e-9 clamped at 1e-6
    adv = call("mssr", torch.tensor([0.5, 0.5001]), mssr_batch(probs=probs, group_index=[0, 1]), eps=0.0)
    assert adv.tolist() == pytest.approx([-1.0, 1.0], rel=1e-3)
    # one response: never normalised, A = R − V̂ (v_init 0.5)
    assert call("mssr", torch.tensor([1.0]), mssr_batch(probs=[[0.5]], group_index=[0])).tolist() == [0.5]
    # normalize = false keeps Ã
    adv = call("mssr", torch.tensor([0.5, 1.5]), mssr_batch(probs=probs, group_index=[0, 1]), normalize=False)
    assert adv.tolist() == [0.0, 1.0]


def test_duplicates_read_one_value_and_update_twice():
    state = fresh("mssr")
    batch = mssr_batch(probs=[[0.5]] * 2, group_index=[0, 0])  # one prompt, two rollouts; KL 0
    adv = call("mssr", torch.tensor([1.0, 0.0]), batch, state=state, normalize=False)
    assert adv.tolist() == [0.5, -0.5]  # both read V̂ = 0.5 before any update
    rho = state["rho"]
    assert rho == pytest.approx(0.875)  # KL 0 → ρ_min under the code's mapping
    assert state["alpha"]["p0"] == pytest.approx(rho * (rho * 4 + 1) + 0)
    assert state["beta"]["p0"] == pytest.approx(rho * (rho * 4 + 0) + 1)
    state2 = fresh("mssr")
    call("mssr", torch.tensor([1.0, 0.0]), batch, state=state2, rho_mapping="decreasing")
    assert state2["rho"] == pytest.approx(0.96)  # the option: KL 0 → ρ_max


def test_rewards_binarised_for_the_tracker_only():
    state = fresh("mssr")
    batch = mssr_batch(probs=[[0.5]] * 3, group_index=[0, 1, 2])
    adv = call("mssr", torch.tensor([0.7, 0.5, 0.2]), batch, state=state, normalize=False)
    assert adv.tolist() == pytest.approx([0.2, 0.0, -0.3])  # raw rewards in the advantage
    rho = state["rho"]
    assert [state["alpha"][k] for k in ("p0", "p1", "p2")] == pytest.approx([rho * 4 + 1, rho * 4, rho * 4])
    state = fresh("mssr")
    call("mssr", torch.tensor([0.7, 0.5, 0.2]), batch, state=state, outcome_threshold=0.1)
    assert [state["alpha"][k] for k in ("p0", "p1", "p2")] == pytest.approx([rho * 4 + 1] * 3)


def padded_kl_batch(padding_value: float):
    """Row 0 has 2 valid tokens of 3, with a log-prob gap of `padding_value` on the padding."""
    mask = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64))
    d = k3_inverse(0.01)
    ref = logp - d
    ref[0, 2] = logp[0, 2] - padding_value
    return make_batch([0, 1], mask, logprobs=logp, ref_logprobs=ref)


def test_kl_row_is_summed_unmasked_by_default():
    d_pad = k3_inverse(0.05)
    state = fresh("mssr")
    call("mssr", torch.tensor([1.0, 0.0]), padded_kl_batch(d_pad), state=state)
    # row 0: (0.01 + 0.01 + 0.05) / 2 valid tokens; row 1: 0.03 / 3
    assert state["kl_history"] == pytest.approx([(0.07 / 2 + 0.01) / 2], rel=1e-5)
    state = fresh("mssr")
    call("mssr", torch.tensor([1.0, 0.0]), padded_kl_batch(d_pad), state=state, kl_rows="masked")
    assert state["kl_history"] == pytest.approx([0.01], rel=1e-5)


def test_a_non_finite_kl_does_not_enter_the_history():
    state = fresh("mssr")
    state["kl_history"] = [0.002]
    call("mssr", torch.tensor([1.0, 0.0]), padded_kl_batch(float("nan")), state=state)
    assert state["kl_history"] == [0.002] and state["rho"] == pytest.approx(0.892)
    assert all(math.isfinite(v) for v in state["alpha"].values())
    call("mssr", torch.tensor([1.0, 0.0]), padded_kl_batch(float("nan")), state=state, kl_rows="masked")
    assert state["kl_history"] == pytest.approx([0.002, 0.01], rel=1e-5)


def test_the_kl_estimator_option():
    state = fresh("mssr")
    batch = mssr_batch(kl=0.006)
    call("mssr", torch.tensor([1.0, 1.0, 0.0, 0.0]), batch, state=state, estimator="k1")
    assert state["kl_history"] == pytest.approx([k3_inverse(0.006)], rel=1e-5)  # k1 = Δ


def test_unseen_prompts_start_at_v_init_with_n0():
    state = fresh("mssr")
    batch = mssr_batch(probs=[[0.5]] * 2, group_index=[0, 1])
    adv = call("mssr", torch.tensor([1.0, 1.0]), batch, state=state, v_init=0.25, rho_min=0.9, normalize=False)
    assert adv.tolist() == pytest.approx([0.75, 0.75])
    n0 = 1 / (1 - 0.9)
    rho = state["rho"]
    assert state["alpha"]["p0"] == pytest.approx(rho * 0.25 * n0 + 1)
    assert state["beta"]["p0"] == pytest.approx(rho * 0.75 * n0)


def test_initialisation_pass_starts_each_prompt_at_its_success_rate():
    """Catalog A §3: initial outcomes [1, 0, 1, 0] with n0 = 1 give N0 = 8 and V̂ = [1, 0, 1, 0]
    (the tracker of the worked example); with two samples a prompt starts at their mean."""
    st = default_registry()["mssr"]
    params = st.params().model_dump()
    state = fresh("mssr")
    st.init(torch.tensor([1.0, 0.0, 1.0, 0.0]), mssr_batch(), **params, state=state)
    assert state["alpha"] == catalog_tracker()["alpha"] and state["beta"] == catalog_tracker()["beta"]
    state = fresh("mssr")
    st.init(torch.tensor([1.0, 0.0, 0.2, 0.9]), mssr_batch(group_index=(0, 0, 1, 1)), **params, state=state)
    assert tracked(state, ("p0", "p1")) == [0.5, 0.5] and state["alpha"]["p0"] + state["beta"]["p0"] == 8.0
    # the run then reads those values: the worked example's first step from a fresh state
    batch = mssr_batch(kl=0.006)
    state = fresh("mssr")
    st.init(torch.tensor([1.0, 0.0, 1.0, 0.0]), batch, **params, state=state)
    state["kl_history"] = [0.004]
    adv = call("mssr", torch.tensor([1.0, 1.0, 0.0, 0.0]), batch, state=state)
    assert adv.tolist() == pytest.approx([0.0, 1.41421356, -1.41421356, 0.0], abs=1e-6)


def mssr_trainer(*sets: str):
    return spec_trainer("mssr.shape", "train.prompts_per_step=16", "train.eval_size=8", "prompts.size=60", *sets)


def test_the_runtime_runs_the_initialisation_pass_over_the_training_set():
    trainer = mssr_trainer()
    dataset = trainer.values["prompts"]
    metrics = trainer.initialise_states()
    state = trainer.stage_states["base"]
    keys = {str(dataset[i].id) for i in range(len(dataset))}
    assert set(state["alpha"]) == keys and metrics["init/base/prompts"] == len(dataset) == 60
    assert metrics["init/base/responses"] == 60
    # n0 = 1: every prompt starts at V̂ 0 or 1 with N0 = 8, and the pass's successes are the
    # initial policy's: some prompts right, some wrong
    values = sorted({round(state["alpha"][k] / 8.0, 6) for k in keys})
    assert values == [0.0, 1.0]
    assert all(state["alpha"][k] + state["beta"][k] == pytest.approx(8.0) for k in keys)
    assert "kl_history" not in state  # the pass leaves the KL history alone
    # deterministic: a second trainer's pass gives the same tracker
    again = mssr_trainer()
    again.initialise_states()
    assert again.stage_states["base"]["alpha"] == state["alpha"]
    # the first step reads the tracker: Ã = R − V̂(x) before normalisation
    trainer.train_step(0)
    assert set(trainer.stage_states["base"]["alpha"]) == keys


def test_no_initialisation_pass_with_zero_samples():
    trainer = mssr_trainer("base.init_samples=0")
    assert trainer.initialise_states() == {}
    assert "alpha" not in trainer.stage_states["base"] or not trainer.stage_states["base"]["alpha"]


# --------------------------------------------------------------------------------------------
# MSSR: state across calls, checkpoints, copies
# --------------------------------------------------------------------------------------------


def test_mssr_state_is_carried_across_steps_and_survives_a_checkpoint():
    batch = mssr_batch(kl=0.006)
    r1, r2 = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    state = catalog_tracker()
    call("mssr", r1, batch, state=state)
    saved = state.state_dict()
    a2 = call("mssr", r2, batch, state=state)
    # step 2 reads the values step 1 left: Ã = R − [1.0, 0.1199, 0.8801, 0.0]
    raw = r2 - torch.tensor([1.0, 1 / 8.34, 7.34 / 8.34, 0.0])
    expected = (raw - raw.mean()) / raw.var(correction=0).sqrt()
    assert a2.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(state["kl_history"]) == 3
    # resume from the checkpoint: the same second step
    resumed = fresh("mssr")
    resumed.load_state_dict(saved)
    assert call("mssr", r2, batch, state=resumed).tolist() == a2.tolist()
    assert resumed.data == state.data
    assert set(state.metrics()) >= {"alpha/mean", "alpha/size", "beta/mean", "kl_history/mean", "rho"}
    # a copy (evaluation, greedy baseline) does not advance the original
    copy = state.copy()
    call("mssr", r1, batch, state=copy)
    assert copy.data != state.data


# --------------------------------------------------------------------------------------------
# MSSR: properties
# --------------------------------------------------------------------------------------------


@st.composite
def mssr_inputs(draw):
    size = draw(st.integers(1, 6))
    tlen = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, tlen), min_size=size, max_size=size))
    mask = [[1.0 if t < n else 0.0 for t in range(tlen)] for n in lengths]
    probs = draw(st.lists(st.lists(st.floats(0.01, 1.0), min_size=tlen, max_size=tlen), min_size=size,
                          max_size=size))
    gap = draw(st.lists(st.lists(st.floats(-3, 3), min_size=tlen, max_size=tlen), min_size=size, max_size=size))
    rewards = draw(st.lists(st.floats(-2, 2), min_size=size, max_size=size))
    return mask, probs, gap, rewards


def mssr_pipeline(mask, probs, gap, rewards, order=None):
    size = len(mask)
    order = list(range(size)) if order is None else order
    logp = torch.log(torch.tensor([probs[i] for i in order], dtype=torch.float64))
    ref = logp - torch.tensor([gap[i] for i in order], dtype=torch.float64)
    batch = make_batch(order, [mask[i] for i in order], logprobs=logp, ref_logprobs=ref)  # prompt i ↦ "p{i}"
    state = fresh("mssr")
    adv = call("mssr", torch.tensor([rewards[i] for i in order]), batch, state=state)
    out = call("mssr.entropy_shaping", adv, batch, call("mssr.token_entropy", batch))
    return adv, out, state, batch


@PROPS
@given(mssr_inputs())
def test_mssr_properties(inputs):
    mask, probs, gap, rewards = inputs
    adv, out, state, batch = mssr_pipeline(*inputs)
    m = batch.mask > 0
    assert torch.isfinite(adv).all() and torch.isfinite(out).all()
    assert (out[~m] == 0).all()  # padding stays 0
    a = adv[:, None].expand_as(out)
    psi = out - a
    assert (psi[m] >= -1e-6).all() and (psi[m] <= a.abs()[m] / 2 + 1e-6).all()
    am, om = a[m], out[m]  # κ = 2 > 1 never flips a sign; A = 0 stays 0
    assert (om[am > 0] > 0).all() and (om[am < 0] < 0).all() and (om[am == 0] == 0).all()
    assert 0.875 <= state["rho"] <= 0.96
    if len(rewards) > 1 and float(adv.abs().max()) > 0:
        assert abs(float(adv.mean())) < 1e-4
    # distinct prompts: permuting the batch permutes the result and leaves the tracker as it is
    order = list(reversed(range(len(mask))))
    adv_p, out_p, state_p, _ = mssr_pipeline(*inputs, order=order)
    assert adv_p.tolist() == pytest.approx(adv[order].tolist(), abs=1e-5)
    close(out_p, out[order], 1e-5)
    assert state_p["alpha"] == pytest.approx(state["alpha"]) and state_p["beta"] == pytest.approx(state["beta"])


# --------------------------------------------------------------------------------------------
# VERL: metrics against an independent float64 SVD reference
# --------------------------------------------------------------------------------------------


def er_svd(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2:
        return 0.0
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / (s.sum() + 1e-8)
    return float(np.exp(-(p * np.log(p + 1e-8)).sum()))


def metrics_reference(h: np.ndarray, stride: int, max_tokens: int = 512):
    """ER of all tokens; window ERs of the last max_tokens tokens (prefixes 0..t, t = s, 2s, ... < m,
    none when m < 2s); ERV = mean_j (ER_j − mean_{l<j} ER_l); ERA = mean_j (v_j − v_{j−1})."""
    er = er_svd(h)
    w = h[-max_tokens:]
    m = w.shape[0]
    ers = [er_svd(w[: t + 1]) for t in range(stride, m, stride)] if m >= 2 * stride else []
    v = [ers[j] - float(np.mean(ers[:j])) for j in range(1, len(ers))]
    a = [v[j] - v[j - 1] for j in range(1, len(v))]
    return er, (float(np.mean(v)) if v else 0.0), (float(np.mean(a)) if a else 0.0), ers


def toy_hidden(seed: int = 0, tlen: int = 13, dim: int = 6):
    """The catalog's shapes: A anisotropic noise, B a scale that grows along the response."""
    g = torch.Generator().manual_seed(seed)
    h_a = torch.randn(tlen, dim, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1],
                                                                                 dtype=torch.float64)[:dim]
    h_b = torch.randn(tlen, dim, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, tlen,
                                                                                     dtype=torch.float64)[:, None]
    return h_a, h_b


def test_metrics_match_a_float64_svd_reference():
    h_a, h_b = toy_hidden()
    hidden = torch.stack([h_a, h_b]).float()
    mask = torch.ones(2, 13)
    er, erv, era = ss.rank_metrics(hidden, mask, stride=3, er_precision="float32")
    ers, exists = ss.window_effective_ranks(hidden, mask, stride=3)
    assert exists.all() and ers.shape == (2, 4)  # windows end at tokens 3, 6, 9, 12 (13 tokens)
    for i, h in enumerate((h_a, h_b)):
        ref_er, ref_erv, ref_era, ref_ers = metrics_reference(h.numpy(), 3)
        assert er[i].item() == pytest.approx(ref_er, rel=1e-5)
        assert ers[i].tolist() == pytest.approx(ref_ers, rel=1e-4)
        assert ers[i, -1].item() == pytest.approx(ref_er, rel=1e-5)  # the last window is the whole response
        # eigensolver noise moves ERV / ERA by up to ~2e-2 between solvers (methods/README)
        assert erv[i].item() == pytest.approx(ref_erv, abs=2e-2)
        assert era[i].item() == pytest.approx(ref_era, abs=2e-2)


def test_metrics_with_padding_truncation_and_short_responses():
    g = torch.Generator().manual_seed(1)
    lengths = [10, 7, 5, 1, 0]
    tlen, dim = 12, 8
    hidden = torch.randn(len(lengths), tlen, dim, generator=g)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(tlen)] for n in lengths])
    noisy = hidden.clone()
    hidden = hidden * mask[..., None]  # zero on padding, as the runtime records it
    noisy[mask == 0] = 1e3  # garbage on the padding must not matter
    for h in (hidden, noisy):
        er, erv, era = ss.rank_metrics(h, mask, stride=2, max_tokens=6, er_precision="float32")
        for i, n in enumerate(lengths):
            ref_er, ref_erv, ref_era, _ = metrics_reference(hidden[i, :n].double().numpy(), 2, max_tokens=6)
            # with fewer tokens than hidden units the kept eigenvalues include the centring's null one,
            # whose float32 noise moves ER by ~1e-3 (as in the official Gram route)
            assert er[i].item() == pytest.approx(ref_er, rel=2e-3, abs=1e-6)
            assert erv[i].item() == pytest.approx(ref_erv, abs=2e-2)
            assert era[i].item() == pytest.approx(ref_era, abs=2e-2)
    # 5 tokens with stride 2: windows at t = 2, 4 → ERV from one difference, ERA 0; 1 or 0 tokens: all 0
    assert era[2].item() == 0.0 and erv[2].item() != 0.0
    assert er[3].item() == er[4].item() == erv[3].item() == era[4].item() == 0.0
    # a response shorter than 2·stride has no windows
    _, erv, era = ss.rank_metrics(hidden[1:2], mask[1:2], stride=4, er_precision="float32")
    assert erv.item() == 0.0 and era.item() == 0.0


def test_holes_in_the_mask_use_the_valid_tokens_in_order():
    h_a, _ = toy_hidden()
    hidden = torch.zeros(1, 16, 6)
    mask = torch.zeros(1, 16)
    cols = [0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15]
    hidden[0, cols] = h_a.float()
    mask[0, cols] = 1.0
    got = ss.rank_metrics(hidden, mask, stride=3, er_precision="float32")
    want = ss.rank_metrics(h_a.float()[None], torch.ones(1, 13), stride=3, er_precision="float32")
    assert [x.item() for x in got] == pytest.approx([x.item() for x in want], abs=1e-5)


def test_effective_rank_signal_and_its_bfloat16_storage():
    hidden = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    batch = make_batch([0], torch.ones(1, 4), extra={"hidden_states": hidden})
    assert call("verl_er.effective_rank", batch).item() == pytest.approx(2.0, abs=1e-6)
    h_a, h_b = toy_hidden()
    batch = make_batch([0, 0], torch.ones(2, 13), extra={"hidden_states": torch.stack([h_a, h_b]).float()})
    exact = call("verl_er.effective_rank", batch, er_precision="float32")
    stored = call("verl_er.effective_rank", batch)  # the code's default: bfloat16
    assert stored.tolist() == exact.to(torch.bfloat16).float().tolist()
    assert stored.tolist() != exact.tolist()


def test_velocity_and_acceleration_signals():
    ers = torch.tensor([[2.0, 2.5, 2.6]])
    erv, era = ss.rank_dynamics(ers, torch.ones(1, 3, dtype=torch.bool))
    assert erv.item() == pytest.approx(0.425) and era.item() == pytest.approx(-0.15)
    h_a, h_b = toy_hidden()
    hidden = torch.stack([h_a, h_b]).float()
    batch = make_batch([0, 0], torch.ones(2, 13), extra={"hidden_states": hidden})
    _, erv, era = ss.rank_metrics(hidden, torch.ones(2, 13), stride=3)
    assert call("verl_er.velocity", batch, stride=3).tolist() == erv.tolist()
    assert call("verl_er.acceleration", batch, stride=3).tolist() == era.tolist()


# --------------------------------------------------------------------------------------------
# VERL: the bonus (catalog A §6)
# --------------------------------------------------------------------------------------------

CATALOG_MIDS = {"era": 0.05, "erv": 0.10, "er": 4.0}
CATALOG_METRICS = {"era": [-0.0360, 0.0196], "erv": [0.3752, 1.4119], "er": [2.7204, 5.0518]}


def test_psi_worked_example():
    m = {k: torch.tensor(v) for k, v in CATALOG_METRICS.items()}
    psi, d = ss.verl_er_psi(m["era"], m["erv"], m["er"], CATALOG_MIDS)
    # the catalog's metric values are rounded to 4 decimals (ERA 0.0196): d and ψ agree to 2e-4
    assert d.tolist() == pytest.approx([0.0311, 0.2285], abs=2e-4)
    assert psi.tolist() == pytest.approx([0.9514, 0.8302], abs=2e-4)
    # weights: on ER d, on ERV 1 − d
    assert (1 - d[0]).item() == pytest.approx(0.9689, abs=1e-4)
    # the code's default: ER stored in bfloat16 (5.0518 → 5.0625), its deviation computed in bfloat16
    psi16, d16 = ss.verl_er_psi(m["era"], m["erv"], m["er"].to(torch.bfloat16), CATALOG_MIDS)
    assert d16.tolist() == d.tolist()
    assert psi16.tolist() == pytest.approx([0.9514, 0.8308], abs=2e-4)


def test_psi_hypotheses_and_saturation():
    era, erv, er = torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0])
    mids = {"era": 1.0, "erv": 1.0, "er": 0.0}
    # δ = [−1, −1, +5 (clipped)]
    psi, d = ss.verl_er_psi(era, erv, er, mids, hypothesis="fix_two")
    assert psi.item() == pytest.approx(0.5 * math.tanh(5) + 0.5 * math.tanh(-1))
    psi, _ = ss.verl_er_psi(era, erv, er, mids, hypothesis="fix_one")
    assert psi.item() == pytest.approx(math.tanh(5) + math.tanh(-1))
    psi, d = ss.verl_er_psi(era, erv, er, mids, gain=2.0, lam=0.5)
    s = 1 / (1 + math.exp(2.0))
    assert psi.item() == pytest.approx(0.5 * (s * math.tanh(5) + (1 - s) * math.tanh(-1)), rel=1e-5)
    # a zero baseline (the first shaped step): every deviation saturates at ±5
    psi, d = ss.verl_er_psi(torch.tensor([0.3]), torch.tensor([-0.2]), torch.tensor([2.0]),
                            {"era": 0.0, "erv": 0.0, "er": 0.0})
    assert d.item() == pytest.approx(1 / (1 + math.exp(-10)))
    assert psi.item() == pytest.approx(d.item() * math.tanh(5) - (1 - d.item()) * math.tanh(5), rel=1e-5)


def catalog_stage(monkeypatch, er_precision="float32"):
    """The stage with the rank metrics replaced by the catalog's values (its hidden states are not
    published): GRPO A = [+0.866, −0.866] on 3-token responses, mids at the catalog's baselines."""
    er = torch.tensor(CATALOG_METRICS["er"])
    er = er.to(torch.bfloat16) if er_precision == "bfloat16" else er
    metrics = (er, torch.tensor(CATALOG_METRICS["erv"]), torch.tensor(CATALOG_METRICS["era"]))
    monkeypatch.setattr(ss, "rank_metrics", lambda *a, **k: metrics)
    state = fresh("verl_er")
    for k, v in CATALOG_MIDS.items():
        state[f"mid_{k}"] = v
        state[f"last_{k}"] = 0.0  # a previous step exists
    batch = make_batch([0, 0], torch.ones(2, 3), extra={"hidden_states": torch.zeros(2, 3, 4)})
    return torch.tensor([0.8660254, -0.8660254]), batch, state


def test_verl_er_worked_example_on_the_last_token(monkeypatch):
    adv, batch, state = catalog_stage(monkeypatch)
    out = call("verl_er", adv, batch, state=state, gate="intended", er_precision="float32")
    assert out[:, -1].tolist() == pytest.approx([1.2990, -0.4330], abs=1e-4)  # min(ψ, |A|/2) = 0.4330
    close(out[:, :-1], [[0.8660, 0.8660], [-0.8660, -0.8660]], 1e-4)
    assert state["psi"] == pytest.approx((0.9514 + 0.8302) / 2, abs=1e-4)
    # the lagged EMA: updated after ψ with the previous step's means (0 here)
    assert state["mid_er"] == pytest.approx(0.7 * 4.0)
    assert state["last_er"] == pytest.approx((2.7204 + 5.0518) / 2, abs=1e-4)


def test_verl_er_all_tokens_option(monkeypatch):
    adv, batch, state = catalog_stage(monkeypatch)
    out = call("verl_er", adv, batch, state=state, gate="intended", bonus_placement="all_tokens")
    close(out, [[1.2990] * 3, [-0.4330] * 3], 1e-4)


def test_verl_er_release_gate_is_the_default(monkeypatch):
    """The shipped train.sh (add_reward False, add_adv True) never computes ψ: A' = A."""
    adv, batch, state = catalog_stage(monkeypatch)
    out = call("verl_er", adv, batch, state=state)
    close(out, [[0.8660254] * 3, [-0.8660254] * 3], 1e-6)
    assert state["mid_er"] == 4.0 and state["psi"] == 0.0  # the EMA does not move either
    assert state["last_er"] == pytest.approx((2.7204 + 5.0518) / 2, abs=1e-4)  # metrics still recorded


def test_verl_er_bfloat16_er_in_the_stage(monkeypatch):
    adv, batch, state = catalog_stage(monkeypatch, er_precision="bfloat16")
    call("verl_er", adv, batch, state=state, gate="intended")
    assert state["psi"] == pytest.approx((0.9514 + 0.8308) / 2, abs=1e-4)


def step_metrics(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, 5, generator=g)
    return hidden, torch.ones(4, 9)


def test_verl_er_state_across_steps_lagged_and_previous():
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    steps = [step_metrics(s) for s in range(3)]
    means = []
    for hidden, mask in steps:
        er, erv, era = ss.rank_metrics(hidden, mask, stride=2)
        means.append({"era": era.mean().item(), "erv": erv.mean().item(), "er": er.float().mean().item()})
    alpha = 0.3

    def run(baseline):
        state, outs = fresh("verl_er"), []
        for hidden, mask in steps:
            batch = make_batch([0, 0, 1, 1], mask, extra={"hidden_states": hidden})
            mids = {k: state.get(f"mid_{k}", 0.0) for k in ss.INDICATORS}
            outs.append((call("verl_er", adv, batch, state=state, stride=2, gate="intended", baseline=baseline),
                         dict(mids), {k: state[f"mid_{k}"] for k in ss.INDICATORS}, state["psi"]))
        return outs

    lagged = run("lagged")
    # step 1: no shaping, nothing in the EMA
    close(lagged[0][0], adv[:, None].expand(4, 9), 1e-7)
    assert lagged[0][2] == {"era": 0.0, "erv": 0.0, "er": 0.0}
    # step 2 shapes against 0 (saturated δ), then moves the EMA with step 1's means
    assert not torch.allclose(lagged[1][0], adv[:, None].expand(4, 9))
    assert lagged[1][2] == pytest.approx({k: alpha * means[0][k] for k in ss.INDICATORS})
    # step 3's baseline holds step 1 only (≤ t − 2); after it, steps 1 and 2
    assert lagged[2][1] == pytest.approx({k: alpha * means[0][k] for k in ss.INDICATORS})
    assert lagged[2][2] == pytest.approx({k: (1 - alpha) * alpha * means[0][k] + alpha * means[1][k]
                                          for k in ss.INDICATORS})
    previous = run("previous")
    # the option: step 2 already uses step 1's means in its baseline
    assert previous[1][2] == pytest.approx({k: alpha * means[0][k] for k in ss.INDICATORS})
    assert previous[1][3] != pytest.approx(lagged[1][3], abs=1e-3)  # ψ against α·m1 rather than 0
    # the bonus only ever raises an advantage, by at most |A|/κ, on the last token
    for out, *_ in lagged + previous:
        d = out - adv[:, None]
        assert (d[:, :-1] == 0).all() and (d[:, -1] >= 0).all() and (d[:, -1] <= adv.abs() / 2 + 1e-6).all()


def test_verl_er_checkpoint_resume_gives_the_same_step():
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    (h1, m1), (h2, m2) = step_metrics(0), step_metrics(1)
    b1 = make_batch([0, 0, 1, 1], m1, extra={"hidden_states": h1})
    b2 = make_batch([0, 0, 1, 1], m2, extra={"hidden_states": h2})
    state = fresh("verl_er")
    call("verl_er", adv, b1, state=state, stride=2, gate="intended")
    saved = state.state_dict()
    out = call("verl_er", adv, b2, state=state, stride=2, gate="intended")
    resumed = fresh("verl_er")
    resumed.load_state_dict(saved)
    assert call("verl_er", adv, b2, state=resumed, stride=2, gate="intended").tolist() == out.tolist()
    assert resumed.data == state.data
    assert set(state.metrics()) == {f"{p}_{k}" for p in ("mid", "last") for k in ss.INDICATORS} | {"psi"}


# --------------------------------------------------------------------------------------------
# VERL: properties
# --------------------------------------------------------------------------------------------


@st.composite
def verl_inputs(draw):
    size = draw(st.integers(1, 5))
    tlen = draw(st.integers(1, 8))
    dim = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, tlen), min_size=size, max_size=size))
    seed = draw(st.integers(0, 10_000))
    adv = draw(st.lists(st.floats(-3, 3), min_size=size, max_size=size))
    stride = draw(st.integers(1, 3))
    return lengths, tlen, dim, seed, adv, stride


@PROPS
@given(verl_inputs(), st.sampled_from(["last_token", "all_tokens"]), st.sampled_from(["lagged", "previous"]))
def test_verl_er_properties(inputs, placement, baseline):
    lengths, tlen, dim, seed, adv, stride = inputs
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(tlen)] for n in lengths])
    hidden = torch.randn(len(lengths), tlen, dim, generator=g) * mask[..., None]
    a = torch.tensor(adv)

    def run(order):
        state = fresh("verl_er")
        state.data.update({"mid_era": 0.01, "mid_erv": -0.2, "mid_er": 1.5, "last_era": 0.0, "last_erv": 0.1,
                           "last_er": 1.0})
        batch = make_batch(list(range(len(order))), mask[order], extra={"hidden_states": hidden[order]})
        return call("verl_er", a[order], batch, state=state, stride=stride, gate="intended",
                    bonus_placement=placement, baseline=baseline), state

    order = list(range(len(lengths)))
    out, state = run(order)
    m = mask > 0
    assert torch.isfinite(out).all() and (out[~m] == 0).all()
    base = a[:, None].expand_as(out)
    d = out - base
    assert (d[m] >= 0).all() and (d[m] <= base.abs()[m] / 2 + 1e-6).all()
    assert all(math.isfinite(state[k]) for k in state)
    perm = list(reversed(order))
    out_p, state_p = run(perm)
    close(out_p, out[perm], 1e-5)
    assert state_p["mid_er"] == pytest.approx(state["mid_er"], abs=1e-5)
    # each response alone gives the same metrics as in the batch (zero rows add zero eigenvalues)
    er, erv, era = ss.rank_metrics(hidden, mask, stride=stride, er_precision="float32")
    for i in range(len(lengths)):
        one = ss.rank_metrics(hidden[i:i + 1, :max(lengths[i], 1)], mask[i:i + 1, :max(lengths[i], 1)],
                              stride=stride, er_precision="float32")
        assert [x.item() for x in one] == pytest.approx([er[i].item(), erv[i].item(), era[i].item()], abs=1e-2)


# --------------------------------------------------------------------------------------------
# docs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,texts", [
    ("mssr", ["A_i  = (Ã_i − mean_B Ã) / sqrt(max(Var_B(Ã), eps))", "rho_min: number = 0.875",
              "kl_rows: one of 'unmasked', 'masked' = 'unmasked'", "rho_mapping: one of 'code', 'decreasing',"
              " 'fixed' = 'code'", "State kept across steps", "alpha", "kl_history", "arXiv:2512.18215",
              "ruiiu/MSSR", "init_samples: integer = 1",
              "Initialisation pass (before the first step; parameter init_samples)", "tracker starts at its success rate"]),
    ("mssr.entropy_shaping", ["ψ_{i,t}  = min(α · H_{i,t}, |A_{i,t}| / κ)", "alpha: number = 0.4",
                              "kappa: number = 2.0", "arXiv:2506.14758"]),
    ("mssr.token_entropy", ["H_{i,t} = −p_{i,t} · log p_{i,t}", "needs: logprobs"]),
    ("verl_er", ["ψ   = λ · Σ_k w_k · tanh(δ_k)", "gate: one of 'release', 'intended' = 'release'",
                 "bonus_placement: one of 'last_token', 'all_tokens' = 'last_token'",
                 "baseline: one of 'lagged', 'previous' = 'lagged'",
                 "er_precision: one of 'bfloat16', 'float32' = 'bfloat16'", "stride: integer = 40",
                 "State kept across steps", "mid_er", "needs: hidden_states", "arXiv:2509.23808", "hf618/VERL"]),
    ("verl_er.effective_rank", ["ER = exp(−Σ p_k log(p_k + 1e-8))"]),
])
def test_stage_doc_page(name, texts, capsys):
    stage_page_shows(name, texts, capsys)


def test_importing_the_stages_does_not_import_torch():
    code = "import sys, shapeflow.stdlib.shaping_state; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_logs_the_pass_once_and_a_resumed_run_keeps_its_tracker(tmp_path, capsys):
    import json
    from pathlib import Path

    from shapeflow.cli import main

    spec = Path(__file__).resolve().parents[1] / "specs" / "mssr.shape"

    def run(out, steps, *extra):
        code = main(["run", str(spec), "--steps", str(steps), "--out", str(out), "--device", "cpu",
                     "--tracking", "jsonl", "--set", "prompts.size=40", "--set", "train.prompts_per_step=8",
                     "--set", "train.eval_size=8", "--set", "train.checkpoint_every=1", *extra])
        assert code == 0, capsys.readouterr().err
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "straight", 3)
    assert "initialisation pass of 'base': the initial policy answers 40 training prompts 1 time each" in \
        capsys.readouterr().err
    first = straight[0]
    assert first["step"] == -1 and first["init/base/prompts"] == 40.0 and first["init/base/seconds"] > 0
    run(tmp_path / "resumed", 2)
    capsys.readouterr()
    resumed = run(tmp_path / "resumed", 3, "--resume")
    assert "initialisation pass" not in capsys.readouterr().err
    assert sum("init/base/prompts" in r for r in resumed) == 1  # the pass ran once, before step 0
    key = "state/base/alpha/mean"
    assert [r[key] for r in resumed if key in r] == [r[key] for r in straight if key in r]
