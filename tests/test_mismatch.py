"""Train/inference mismatch correction: truncated importance sampling and rejection by the
ratio of the trainer's to the rollout engine's log-probs (verl rollout_correction)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import call, make_batch, spec_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Log:
    def __init__(self):
        self.logged = {}

    def log(self, key, value):
        self.logged[key] = value


def gap_batch(gaps, groups=None):
    groups = groups or [0] * len(gaps)
    width = max(len(g) for g in gaps)
    mask = [[1.0] * len(g) + [0.0] * (width - len(g)) for g in gaps]
    logprobs = [[-1.0] * width for _ in gaps]
    rollout = [[-1.0 - x for x in g] + [0.0] * (width - len(g)) for g in gaps]
    b = make_batch(groups, mask, logprobs=logprobs)
    b.extra["rollout_logprobs"] = torch.tensor(rollout, dtype=torch.float32)
    return b


def test_token_level_tis_truncates_at_the_threshold_and_reports_the_fraction():
    b, ctx = gap_batch([[0.1, 1.0, -0.5]]), Log()
    got = call("mismatch.tis", torch.tensor([1.0]), b, ctx=ctx)
    assert got.tolist()[0] == pytest.approx([math.exp(0.1), 2.0, math.exp(-0.5)], rel=1e-6)
    assert ctx.logged["truncated_frac"] == pytest.approx(1 / 3)
    assert ctx.logged["weight_mean"] == pytest.approx((math.exp(0.1) + 2 + math.exp(-0.5)) / 3, rel=1e-6)


def test_sequence_level_tis_uses_the_product_over_the_response():
    b = gap_batch([[0.1, 1.0, -0.5], [0.5, 0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    got = call("mismatch.tis", adv, b, level="sequence")
    assert got.tolist()[0] == pytest.approx([math.exp(0.6)] * 3, rel=1e-6)
    assert got.tolist()[1] == pytest.approx([-2.0 * 2.0, -2.0 * 2.0, 0.0], rel=1e-6)  # e^1 > 2: truncated


def test_rejection_masks_tokens_or_responses_outside_the_band():
    b, ctx = gap_batch([[0.1, 1.0, -1.0]]), Log()
    kept = call("mismatch.reject", b, ctx=ctx)
    assert kept.mask.tolist() == [[1.0, 0.0, 0.0]] and b.mask.tolist() == [[1.0, 1.0, 1.0]]
    assert ctx.logged["masked_frac"] == pytest.approx(2 / 3)
    whole = call("mismatch.reject", gap_batch([[0.1, 0.2], [1.0, 0.5]]), level="sequence")
    assert whole.mask.tolist() == [[1.0, 1.0], [0.0, 0.0]]  # e^0.3 kept, e^1.5 dropped
    with pytest.raises(Exception, match="low must be below high"):
        call("mismatch.reject", b, low=1.0, high=1.0)


def test_the_generate_engine_records_its_sampling_logprobs_and_tis_trains():
    trainer = spec_trainer("grpo_tis.shape", "train.prompts_per_step=4")
    _, batch = trainer.rollout_phase(0)  # before any update: sampler and trainer see the same weights
    rollout, old, mask = batch.extra["rollout_logprobs"], batch.logprobs, batch.mask
    assert rollout.shape == old.shape and (rollout[mask == 0] == 0).all()
    assert (rollout - old)[mask > 0].abs().max() < 1e-4  # the same model: decode vs full-forward numerics only
    metrics = trainer.train_step(1)
    assert metrics["rollout/adv/truncated_frac"] == 0.0
    assert metrics["rollout/adv/weight_mean"] == pytest.approx(1.0, abs=1e-4)


def test_without_a_stage_that_needs_them_no_sampling_logprobs_are_recorded():
    trainer = spec_trainer("grpo.shape", "train.prompts_per_step=2")
    _, batch = trainer.rollout_phase(0)
    assert "rollout_logprobs" not in batch.extra
