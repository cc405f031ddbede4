"""DAPO's reward shaping and overlong filtering (catalog B3)."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_batch
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
