"""PPO with a critic: GAE (verl's loop), the clipped value loss, the critic stages, the runtime's
values needs, checkpoints, and the checker's diagnostic when no critic supplies them."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import call, make_batch  # noqa: E402

from shapeflow.cli import main  # noqa: E402
from shapeflow.compiler.pipeline import build_plan, compile_spec  # noqa: E402
from shapeflow.runtime.trainer import Trainer  # noqa: E402
from shapeflow.stdlib.critic import gae  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def batch_with_values(rewards_mask, values, **extra):
    b = make_batch(list(range(len(values))), rewards_mask)
    b.extra["values"] = torch.tensor(values, dtype=torch.float32)
    b.extra.update({k: torch.tensor(v, dtype=torch.float32) for k, v in extra.items()})
    return b


def ref_gae(rewards, values, mask, gamma, lam):
    """verl's compute_gae_advantage_return, transcribed as a per-row Python loop (float64)."""
    out = []
    for r, v, m in zip(rewards, values, mask):
        next_value, last, row = 0.0, 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            delta = r[t] + gamma * next_value - v[t]
            adv = delta + gamma * lam * last
            next_value = v[t] * m[t] + (1 - m[t]) * next_value
            last = adv * m[t] + (1 - m[t]) * last
            row[t] = adv
        out.append(row)
    return out


def test_gae_worked_examples():
    b = batch_with_values([[1.0, 1.0, 1.0]], [[0.5, 0.6, 0.7]])
    r = torch.tensor([1.0])  # an outcome reward: placed on the last token
    adv = call("gae", r, b, gamma=1.0, lam=1.0, whiten=False)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.3], abs=1e-6)
    adv = call("gae", r, b, gamma=0.9, lam=0.5, whiten=False)
    assert adv.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3], abs=1e-6)
    ret = call("gae_returns", r, b, gamma=1.0, lam=1.0)
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    whitened = call("gae", r, b, gamma=1.0, lam=1.0)
    x = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)
    assert whitened[0].double().tolist() == pytest.approx(((x - x.mean()) / (x.var() + 1e-8).sqrt()).tolist(), abs=1e-5)


def test_gae_matches_verls_loop_with_padding_and_holes():
    rng = random.Random(0)
    for _ in range(30):
        B, T = rng.randint(1, 5), rng.randint(1, 7)
        mask = [[float(rng.random() < 0.8) for _ in range(T)] for _ in range(B)]
        rewards = [[rng.uniform(-1, 1) * m for m in row] for row in mask]
        values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(B)]
        gamma, lam = rng.choice([1.0, 0.99, 0.5]), rng.choice([1.0, 0.95, 0.0])
        got = gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                  torch.tensor(mask, dtype=torch.float64), gamma, lam)
        want = ref_gae(rewards, values, mask, gamma, lam)
        for g, w, m in zip(got.tolist(), want, mask):
            assert [x for x, k in zip(g, m) if k] == pytest.approx([x for x, k in zip(w, m) if k], abs=1e-12)


def test_value_loss_worked_example_and_gradient():
    b = batch_with_values([[1.0, 1.0, 0.0]], [[0.2, 0.2, 9.0]])
    current = torch.tensor([[1.0, 0.3, 5.0]], requires_grad=True)
    b.extra["current_values"] = current
    returns = torch.tensor([[0.5, 0.5, 0.0]])
    loss = call("losses.value", returns, b, clip=0.5)
    # token 0: max((1 − 0.5)², (0.7 − 0.5)²) = 0.25; token 1: clip(0.3, −0.3, 0.7) = 0.3: 0.04; mean of ½·
    assert float(loss.detach()) == pytest.approx(0.5 * (0.25 + 0.04) / 2, abs=1e-7)
    loss.backward()
    # ∂/∂V of ½(V − R)²/2 tokens: (V − R)/2 where the unclipped term is the max; padding gets 0
    assert current.grad.tolist()[0] == pytest.approx([0.25, -0.1, 0.0], abs=1e-6)
    unclipped = call("losses.value", returns, b, clip=None)
    assert float(unclipped) == pytest.approx(0.5 * (0.25 + 0.04) / 2, abs=1e-7)


def trainer_for(spec_text: str, tmp_path: Path, *sets: str) -> Trainer:
    (tmp_path / "grpo.shape").write_text((ROOT / "specs" / "grpo.shape").read_text())
    (tmp_path / "ppo_gae.shape").write_text((ROOT / "specs" / "ppo_gae.shape").read_text())
    spec = tmp_path / "spec.shape"
    spec.write_text(spec_text)
    result = compile_spec(spec, sets=["train.prompts_per_step=8", *sets])
    assert result.ok, [str(d) for d in result.diagnostics]
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    return trainer


VALUE_HEAD = """\
spec ppo_head { extends = "ppo_gae.shape" }
model critic = models.value_head(policy, lr = 1e-2)
"""


def test_a_value_head_on_the_policy_trains_and_is_checkpointed_with_it(tmp_path):
    trainer = trainer_for(VALUE_HEAD, tmp_path)
    head = trainer.critic.head
    assert trainer.critic.shared and trainer.policy.model.value_head is head
    before = head.weight.detach().clone()
    metrics = trainer.train_step(0)
    values = trainer.last_batch.extra["values"]
    assert values.shape == trainer.last_batch.mask.shape and (values[trainer.last_batch.mask == 0] == 0).all()
    assert metrics["node/loss#3"] > 0  # the value loss
    assert not torch.equal(before, head.weight.detach())  # the head learned
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(1e-2)  # its own learning rate
    assert "value_head.weight" in trainer.state_dict()["model"]


def test_values_at_the_behaviour_pass_equal_a_full_forward(tmp_path):
    from shapeflow.runtime.engine import token_values

    trainer = trainer_for(VALUE_HEAD, tmp_path)
    trainer.train_step(0)
    b, model, head = trainer.last_batch, trainer.policy.model, trainer.critic.head
    with torch.no_grad():
        ids = torch.cat([b.prompt_tokens, b.response_ids], 1)
        attention = torch.cat([b.prompt_mask, b.mask.long()], 1)
        out = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
        P = b.prompt_tokens.shape[1]
        want = head(out.hidden_states[-1][:, P - 1 : -1]).squeeze(-1) * b.mask  # the state before each token
        separate = token_values(model, head, b.prompt_tokens, b.prompt_mask, b.response_ids, b.mask)
    assert torch.allclose(separate, want, atol=1e-5)


def test_a_separate_critic_is_saved_and_restored(tmp_path, capsys):
    (tmp_path / "ppo_gae.shape").write_text((ROOT / "specs" / "ppo_gae.shape").read_text())
    out = tmp_path / "run"
    args = ["run", str(tmp_path / "ppo_gae.shape"), "--out", str(out), "--device", "cpu", "--tracking", "jsonl",
            "--set", "train.prompts_per_step=8", "--set", "train.checkpoint_every=1", "--set", "train.eval_size=8"]
    assert main([*args, "--steps", "2"]) == 0, capsys.readouterr().err
    from shapeflow.runtime.run import checkpoint_dirs, load_checkpoint

    state = load_checkpoint(checkpoint_dirs(out)[-1])
    assert "value_head.weight" in state["critic"] and "value_head.weight" not in state["model"]
    result = compile_spec(tmp_path / "ppo_gae.shape", sets=["train.prompts_per_step=8"])
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    trainer.load_state_dict(state)
    assert torch.equal(trainer.critic.head.weight, state["critic"]["value_head.weight"])


def test_values_without_a_critic_is_a_check_error(tmp_path, capsys):
    (tmp_path / "grpo.shape").write_text((ROOT / "specs" / "grpo.shape").read_text())
    (tmp_path / "bad.shape").write_text('spec bad { extends = "grpo.shape" }\nadvantage adv = gae(r, groups)\n')
    assert main(["check", str(tmp_path / "bad.shape")]) == 1
    out = capsys.readouterr().out
    assert "bad.shape:2:17: error[E701]: 'gae' needs 'values' (the critic's value V(s_t) of the state each " \
           "response token is chosen in, from the behaviour pass (old values; needs a critic: models.value_head " \
           "or models.critic)), and no model in this spec supplies it" in out
    assert "help: declare a model that does (models.critic, models.value_head)" in out


# --------------------------------------------------------------------------------------------
# verl's optimal token baseline (a token-level baseline from Σπ²)
# --------------------------------------------------------------------------------------------


def otb_batch(rewards_last):
    mask = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    logprobs = [[math.log(0.9), math.log(0.2), 0.0], [math.log(0.5)] * 3]
    b = make_batch([0, 0], mask, logprobs=logprobs)
    b.extra["sum_pi_squared"] = torch.tensor([[0.82, 0.5, 0.0], [0.5, 0.5, 0.5]])
    return b, torch.tensor(rewards_last, dtype=torch.float32)


def test_optimal_token_baseline_worked_example():
    b, r = otb_batch([1.0, 0.0])
    got = call("optimal_token_baseline", r, b)
    want = [[1 - 0.02 / 0.52, 1 - 1.12 / 2.12, 0.0], [-0.02 / 0.52, -1.12 / 2.12, 0.0]]
    assert got.tolist()[0] == pytest.approx(want[0], abs=1e-6) and got.tolist()[1] == pytest.approx(want[1], abs=1e-6)
    b, r = otb_batch([0.0, 1.0])
    tail = call("optimal_token_baseline", r, b)
    assert tail.tolist()[1] == pytest.approx([1 - 0.5 / 0.52, 1 - 1.0 / 2.12, 1.0], abs=1e-6)
    no_tail = call("optimal_token_baseline", r, b, zero_tail=False)
    assert no_tail.tolist()[1] == pytest.approx([1 - 0.5 / 0.52, 1 - 1.0 / 2.12, 0.0], abs=1e-6)


def ref_otb(returns, energy, mask, groups, zero_tail=True, eps=1e-8):
    """verl's per-group loop, transcribed in float64 Python."""
    T = len(mask[0])
    out = [[0.0] * T for _ in mask]
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        base = [[0.0] * T for _ in idx]
        if len(idx) > 1:
            for t in range(T):
                num = sum(returns[i][t] * energy[i][t] * mask[i][t] for i in idx)
                den = sum(energy[i][t] * mask[i][t] for i in idx) + eps
                for k in range(len(idx)):
                    base[k][t] = num / den
            if zero_tail:
                lengths = [sum(mask[i]) for i in idx]
                ordered = sorted(lengths)
                if lengths.count(ordered[-1]) == 1 and ordered[-1] > ordered[-2]:
                    k = lengths.index(ordered[-1])
                    for t in range(int(ordered[-2]), T):
                        base[k][t] = 0.0
        for k, i in enumerate(idx):
            out[i] = [(returns[i][t] - base[k][t]) * mask[i][t] for t in range(T)]
    return out


def test_optimal_token_baseline_matches_verls_loop_on_random_batches():
    rng = random.Random(1)
    for _ in range(25):
        groups = sorted(rng.randint(0, 3) for _ in range(rng.randint(1, 8)))
        groups = [sorted(set(groups)).index(g) for g in groups]
        T = rng.randint(1, 6)
        lengths = [rng.randint(0, T) for _ in groups]
        mask = [[1.0 if t < n else 0.0 for t in range(T)] for n in lengths]
        r = [rng.choice([0.0, 1.0, 0.5]) for _ in groups]
        lp = [[math.log(rng.uniform(0.05, 1.0)) for _ in range(T)] for _ in groups]
        sq = [[rng.uniform(0.05, 1.0) for _ in range(T)] for _ in groups]
        b = make_batch(groups, mask, logprobs=lp)
        b.extra["sum_pi_squared"] = torch.tensor(sq, dtype=torch.float32)
        for zero_tail in (True, False):
            got = call("optimal_token_baseline", torch.tensor(r), b, zero_tail=zero_tail).tolist()
            returns = [[r[i] if 0 <= n - 1 and t <= n - 1 else 0.0 for t in range(T)]
                       for i, n in enumerate(lengths)]
            energy = []
            for i in range(len(groups)):
                acc, row = 0.0, []
                for t in range(T):
                    acc += (1 - 2 * math.exp(lp[i][t]) + sq[i][t]) * mask[i][t]
                    row.append(acc)
                energy.append(row)
            want = ref_otb(returns, energy, mask, groups, zero_tail)
            for g_row, w_row in zip(got, want):
                assert g_row == pytest.approx(w_row, abs=2e-5)


# --------------------------------------------------------------------------------------------
# properties (hypothesis): finite, zero on padding, rows permuted with the batch
# --------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPS = settings(derandomize=True, max_examples=40, deadline=None, database=None)


@st.composite
def token_batches(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    T = draw(st.integers(1, 6))
    lengths = [draw(st.integers(0, T)) for _ in groups]
    floats = st.floats(-3, 3, allow_nan=False, allow_subnormal=False, width=32)
    rewards = [draw(floats) for _ in groups]
    values = [[draw(floats) for _ in range(T)] for _ in groups]
    probs = [[draw(st.floats(0.015625, 1.0, allow_subnormal=False, width=32)) for _ in range(T)] for _ in groups]
    perm = draw(st.permutations(range(len(groups))))
    return groups, lengths, T, rewards, values, probs, list(perm)


def _token_batch(groups, lengths, T, values, probs, order=None):
    order = order or list(range(len(groups)))
    mask = [[1.0 if t < lengths[i] else 0.0 for t in range(T)] for i in order]
    b = make_batch([groups[i] for i in order], mask, logprobs=[[math.log(p) for p in probs[i]] for i in order])
    b.prompt_ids = [f"p{groups[i]}" for i in order]
    garbage = torch.full((len(order), T), float("nan"))  # what padding may hold: must not leak
    m = torch.tensor(mask) > 0
    b.extra["values"] = torch.where(m, torch.tensor([values[i] for i in order]), garbage)
    b.extra["sum_pi_squared"] = torch.where(m, torch.tensor([[p * p for p in probs[i]] for i in order]), garbage)
    return b


@PROPS
@given(token_batches(), st.sampled_from([(1.0, 1.0), (0.9, 0.95), (0.5, 0.0)]))
def test_gae_and_otb_properties(data, gl):
    groups, lengths, T, rewards, values, probs, perm = data
    b = _token_batch(groups, lengths, T, values, probs)
    p = _token_batch(groups, lengths, T, values, probs, perm)
    r = torch.tensor(rewards)
    for name, kw in (("gae", {"gamma": gl[0], "lam": gl[1]}), ("gae_returns", {"gamma": gl[0], "lam": gl[1]}),
                     ("optimal_token_baseline", {})):
        out = call(name, r, b, **kw)
        assert torch.isfinite(out).all(), name
        assert (out[b.mask == 0] == 0).all(), name
        permuted = call(name, r[perm], p, **kw)
        assert torch.allclose(permuted, out[perm], atol=1e-5), name


@PROPS
@given(token_batches())
def test_value_loss_properties(data):
    groups, lengths, T, rewards, values, probs, perm = data
    b = _token_batch(groups, lengths, T, values, probs)
    p = _token_batch(groups, lengths, T, values, probs, perm)
    current = torch.tensor(values) * 0.5
    returns = torch.tensor(values) + 0.25
    b.extra["current_values"], p.extra["current_values"] = current, current[perm]
    loss = call("losses.value", returns, b)
    assert torch.isfinite(loss)
    assert float(call("losses.value", returns[perm], p)) == pytest.approx(float(loss), abs=1e-6)


def test_otb_group_of_equal_returns_and_lengths_has_zero_advantage():
    b = _token_batch([0, 0, 0], [3, 3, 3], 3, [[0.0] * 3] * 3, [[0.5, 0.3, 0.9], [0.2, 0.2, 0.2], [0.7, 0.6, 0.5]])
    out = call("optimal_token_baseline", torch.tensor([1.0, 1.0, 1.0]), b)
    assert out.abs().max() < 1e-6  # B_t = r·ΣW/ΣW: the baseline is the common return
