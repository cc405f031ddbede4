"""Signals read off the rollout itself: lengths, entropies."""

from __future__ import annotations

from shapeflow._lazy import torch
from shapeflow.stdlib.registry import stage


@stage("signals.length", kind="signal", inputs={"groups": "Rollouts"}, output="Signal[seq]")
def length(groups):
    """The number of tokens of each response, |y_i| = Σ_t m_{i,t}.

    For length penalties, e.g. ``reward r = correct - 0.001 * signals.length(groups)``.
    Example: masks [[1,1,0],[1,1,1]] give [2, 3].
    """
    return groups.mask.sum(-1)


@stage(
    "signals.entropy",
    kind="signal",
    inputs={"groups": "Rollouts"},
    output="Signal[tok]",
    needs=("entropy",),
)
def entropy(groups):
    """The behaviour policy's token entropy, H_{i,t} = −Σ_v π_old(v | y_{i,<t}) log π_old(v | y_{i,<t}).

    Zero on padding. Computed by the rollout engine from the full logits at sampling time.
    """
    entropy = groups.need("entropy")
    return torch.where(groups.mask > 0, entropy, torch.zeros_like(entropy))


@stage("signals.at_last_token", kind="signal", inputs={"values": "Signal[seq]", "groups": "Rollouts"},
       output="Signal[tok]")
def at_last_token(values, groups):
    """A per-response value placed on the response's last token, zero elsewhere.

        s_{i,t} = v_i · 1[t = |y_i| − 1]

    How verl writes an outcome score into token rewards (``token_level_rewards[i, T_i − 1]``),
    so that a token-level reward such as ``signals.at_last_token(correct, groups) − 0.001 *
    rewards.kl_penalty(groups)`` keeps the score on one token. Example: v = [1, 2], masks
    [[1, 1, 0], [1, 0, 0]] give [[0, 1, 0], [2, 0, 0]].
    """
    from shapeflow.stdlib.functional import place_at_last_token

    return place_at_last_token(values.to(torch.float32), groups.mask)
