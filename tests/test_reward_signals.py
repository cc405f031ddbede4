"""Token-level rewards: a score on the last token, the KL penalty folded into the reward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import call, make_batch


def test_at_last_token_places_the_score_on_the_last_valid_token():
    batch = make_batch([0, 0], [[1, 1, 0], [1, 0, 0]])
    got = call("signals.at_last_token", torch.tensor([1.0, 2.0]), batch)
    assert got.tolist() == [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]


@pytest.mark.parametrize("estimator, expected", [
    ("k1", [0.5, -1.0, 0.0]),
    ("abs", [0.5, 1.0, 0.0]),
    ("k2", [0.125, 0.5, 0.0]),
    ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]),
])
def test_kl_penalty_per_token_with_padding_zero(estimator, expected):
    batch = make_batch([0], [[1, 1, 0]], logprobs=[[-1.0, -2.0, float("nan")]], ref_logprobs=[[-1.5, -1.0, 7.0]])
    got = call("rewards.kl_penalty", batch, estimator=estimator)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_kl_in_the_reward_keeps_the_score_on_one_token():
    """r = at_last_token(score) − β·kl: the return-to-go sums the KL of the tokens still to come."""
    batch = make_batch([0, 1], [[1, 1], [1, 1]], logprobs=[[-1.0, -1.0], [-1.0, -1.0]],
                       ref_logprobs=[[-1.5, -1.0], [-1.0, -0.5]])
    r = call("signals.at_last_token", torch.tensor([1.0, 0.0]), batch) - 0.1 * call("rewards.kl_penalty", batch)
    assert r.flatten().tolist() == pytest.approx([-0.05, 1.0, 0.0, 0.05])
