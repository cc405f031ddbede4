"""DAPO's reward shaping and overlong filtering (catalog B3)."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_batch, spec_trainer
from pydantic import ValidationError


def lengths_batch(lengths: list[int], T: int = 24, truncated: list[bool] | None = None):
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    kw = {"truncated": torch.tensor(truncated)} if truncated is not None else {}
    return make_batch(range(len(lengths)), mask, **kw)


def test_overlong_penalty_matches_the_catalog_vector():
    batch = lengths_batch([12, 13, 16, 20])
    got = call("rewards.overlong_penalty", batch, max_len=20, cache_len=8)
    assert got.tolist() == [0.0, -0.125, -0.5, -1.0]


def test_overlong_penalty_code_has_no_floor_and_the_paper_has():
    batch = lengths_batch([22])
    assert call("rewards.overlong_penalty", batch, max_len=20, cache_len=8).tolist() == [-1.25]
    assert call("rewards.overlong_penalty", batch, max_len=20, cache_len=8, floor=True).tolist() == [-1.0]
    assert call("rewards.overlong_penalty", batch, max_len=20, cache_len=8, penalty_factor=0.5).tolist() == [-0.625]


def test_overlong_penalty_refuses_a_cache_longer_than_the_limit():
    with pytest.raises(ValidationError, match="cache_len must be at most max_len"):
        call("rewards.overlong_penalty", lengths_batch([1]), max_len=4, cache_len=8)


def test_drop_truncated_masks_truncated_rows_only():
    batch = lengths_batch([2, 3, 1], T=3, truncated=[False, True, False])
    kept = call("rollouts.drop_truncated", batch)
    assert kept.mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]  # the original is untouched
    assert kept.group_index.tolist() == [0, 1, 2]


def test_a_loss_on_dropped_rows_ignores_them():
    batch = lengths_batch([2, 2], T=2, truncated=[False, True])
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    batch.logprobs = lp.detach().clone()
    batch.extra["policy_logprobs"] = lp
    kept = call("rollouts.drop_truncated", batch)
    loss = call("losses.ppo_clip", torch.tensor([1.0, 5.0]), kept)
    loss.backward()
    assert float(loss.detach()) == -1.0  # token-mean over the kept row only
    assert lp.grad[1].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------
# dynamic sampling (verl's DAPO recipe filter_groups)
# --------------------------------------------------------------------------------------------


def spread_batch(groups, metric, T=2, tag="a"):
    b = make_batch(groups, torch.ones(len(groups), T), responses=[f"{tag}{i}" for i in range(len(groups))])
    b.prompt_ids = [f"{tag}{g}" for g in groups]
    b.prompt_tokens = torch.ones(len(groups), 3, dtype=torch.long)
    b.prompt_mask = torch.ones(len(groups), 3, dtype=torch.long)
    return b, torch.tensor(metric, dtype=torch.float32)


class FakeCtx:
    """The runtime's side of dynamic sampling: a budget, more rounds on demand, a metrics sink."""

    def __init__(self, budget, rounds):
        from types import SimpleNamespace

        self.trainer = SimpleNamespace(config=SimpleNamespace(prompts_per_step=budget))
        self.rounds, self.logged = list(rounds), {}

    def regenerate(self):
        return self.rounds.pop(0)

    def log(self, key, value):
        self.logged[key] = value


def test_dynamic_sampling_keeps_groups_with_spread_and_singletons():
    batch, metric = spread_batch([0, 0, 0, 0, 1, 1, 1, 1, 2], [1, 1, 0, 1, 0, 0, 0, 0, 1])
    kept = call("rollouts.dynamic_sampling", batch, metric)  # no runtime (replay): filter only
    assert kept.responses == ["a0", "a1", "a2", "a3", "a8"]
    assert kept.group_index.tolist() == [0, 0, 0, 0, 1]  # renumbered


def test_dynamic_sampling_refills_to_the_budget_then_cuts_to_it():
    first = spread_batch([0, 0, 1, 1, 2, 2], [1, 0, 1, 1, 0, 1], tag="a")  # keeps groups 0, 2
    second = spread_batch([0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 0, 0], T=4, tag="b")  # keeps 0, 1
    ctx = FakeCtx(budget=3, rounds=[second])
    out = call("rollouts.dynamic_sampling", *first, ctx=ctx)
    assert out.responses == ["a0", "a1", "a4", "a5", "b0", "b1"]  # the first three kept groups
    assert out.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.mask.shape == (6, 4) and out.mask[:4, 2:].sum() == 0  # the first round padded to the widest
    assert ctx.logged == {"rounds": 2, "kept_groups": 4, "dropped_groups": 2, "shortfall_groups": 0}


def test_dynamic_sampling_stops_at_max_rounds_and_reports_the_shortfall():
    flat = [spread_batch([0, 0, 1, 1], [1, 1, 0, 0], tag=t) for t in "abc"]
    ctx = FakeCtx(budget=2, rounds=flat[1:])
    out = call("rollouts.dynamic_sampling", *flat[0], ctx=ctx, max_rounds=3)
    assert ctx.logged == {"rounds": 3, "kept_groups": 0, "dropped_groups": 6, "shortfall_groups": 2}
    assert out.responses == ["c0", "c1", "c2", "c3"]  # nothing survived: the last round, unfiltered
    ctx = FakeCtx(budget=2, rounds=flat[1:])
    with pytest.raises(RuntimeError, match="dynamic sampling kept 0 of 2 groups in 2 rounds"):
        call("rollouts.dynamic_sampling", *flat[0], ctx=ctx, max_rounds=2, on_shortfall="error")


def test_the_dapo_spec_trains_on_groups_with_spread_only():
    trainer = spec_trainer("dapo.shape", "train.prompts_per_step=4")
    metrics = trainer.train_step(0)
    batch = trainer.last_batch
    assert metrics["rollout/groups/rounds"] >= 1 and metrics["rollout/groups/shortfall_groups"] == 0
    assert batch.size == 4 * 8 and metrics["rollout/responses"] == 32
    correct = trainer.last_values["correct"]
    for g in range(4):
        values = correct[batch.group_index == g]
        assert values.min() < values.max()  # every group the loss sees has spread


def test_dynamic_sampling_keeps_exactly_the_groups_with_spread_on_random_batches():
    import random

    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 6))]
        groups = [g for g, n in enumerate(sizes) for _ in range(n)]
        metric = [float(rng.choice([0, 1])) for _ in groups]
        batch, m = spread_batch(groups, metric)
        kept = call("rollouts.dynamic_sampling", batch, m)
        want = [i for i, g in enumerate(groups)
                if sizes[g] == 1 or len({metric[j] for j, h in enumerate(groups) if h == g}) > 1]
        want = want or list(range(len(groups)))  # nothing survives: the batch as it is (documented)
        assert kept.responses == [f"a{i}" for i in want]
        assert torch.isfinite(kept.mask).all()
