#!/usr/bin/env python3
"""Each advantage and loss stage against a hand-fused torch reference of the same math.

One synthetic batch (default 4,096 responses × 1,024 tokens, groups of 8 in a shuffled order,
a random valid prefix per row). For every advantage stage (forward) and every loss stage
(forward + backward to the current-policy log-probs) that the registry holds, the stage is
called as the runtime calls it (``st.fn(*inputs, **st.params(**params).model_dump())``; the
parameters are validated once, outside the timing) and compared with a reference written
directly in torch below: same inputs, same parameters (the stage's defaults), the same
result up to float32 rounding, in as few tensor operations as the formula allows. Stage and
reference alternate (A B, B A, ...); each sample averages enough calls to last
``--min-sample`` seconds; the table gives the median per call and the ratio of the medians,
stage / reference. The target is <= 1.2 (marked "!" above it).

Before timing, every reference is also checked against its stage on a small batch with
the awkward cases (masks with holes, empty rows, NaN on padding, singleton and all-equal
groups, token-level advantages), so a reference is not faster for handling less.

Advantage and loss stages that the registry holds but this script has no reference for are
listed, as are references whose stage is not (yet) registered (skipped).

    .venv/bin/python bench/stages.py                       # the full table
    .venv/bin/python bench/stages.py --only losses.ppo_clip --repeats 11
    .venv/bin/python bench/stages.py --rows 512 --tokens 256 --json
    .venv/bin/python bench/stages.py --profile --only reinforce_pp   # time by source line

See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shapeflow.runtime.batch import RolloutBatch  # noqa: E402
from shapeflow.stdlib.registry import default_registry  # noqa: E402

TARGET = 1.2
INF = float("inf")


# ---------------------------------------------------------------------------------------------
# the batch
# ---------------------------------------------------------------------------------------------


def make_batch(B: int, T: int, group: int = 8, seed: int = 0, *, awkward: bool = False,
               holes: bool = True) -> dict[str, Any]:
    """The synthetic inputs: a RolloutBatch plus sequence rewards and a token reward.

    Groups of ``group`` responses, shuffled by a fixed permutation (never contiguous); each
    row's valid prefix length uniform in [1, T]; rewards 0/1 from a per-group pass rate, with
    a fifth of them replaced by a fraction; log-probs N(−1, 0.3²). ``awkward`` adds what the
    correctness check needs: holes inside rows, empty rows, NaN on padding, a singleton group
    and group sizes 1..group (not for timing)."""
    g = torch.Generator().manual_seed(seed)
    G = max(1, B // group)
    if awkward:
        sizes = torch.randint(1, group + 1, (G,), generator=g)
        sizes[0] = 1  # a singleton
        gi = torch.repeat_interleave(torch.arange(G), sizes)
        B = gi.numel()
    else:
        gi = torch.arange(B) // group
        gi = gi.clamp(max=G - 1)
    gi = gi[torch.randperm(B, generator=g)]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos < lengths[:, None]).to(torch.float32)
    if awkward:
        if holes:
            gaps = (torch.rand(B, T, generator=g) < 0.05) & (torch.rand(B, 1, generator=g) < 0.5)
            mask = torch.where(gaps, torch.zeros_like(mask), mask)
        mask[1] = 0.0  # an empty row
        mask[2] = 0.0
        mask[2, 0] = 1.0  # a row of one token
    p = torch.rand(G, generator=g)[gi]
    rewards = (torch.rand(B, generator=g) < p).to(torch.float32)
    frac = torch.rand(B, generator=g) < 0.2
    rewards = torch.where(frac, torch.rand(B, generator=g), rewards)
    if awkward:  # an all-equal group of fractional rewards (not 0/1), so a rounded mean can bite
        big = int(torch.bincount(gi).argmax())
        rewards[gi == big] = 0.3

    def lp() -> torch.Tensor:
        return -1.0 + 0.3 * torch.randn(B, T, generator=g)

    logprobs, ref_logprobs = lp(), lp()
    policy = (logprobs + 0.15 * torch.randn(B, T, generator=g)).clamp(max=0.0)  # ratios around 1, some clipped
    entropy = torch.rand(B, T, generator=g) * 3.0
    token_reward = torch.where(mask > 0, -0.001 * torch.rand(B, T, generator=g), torch.zeros(B, T))
    if awkward:  # some far-off-policy tokens, so the dual clip and the wide clamps act
        far = torch.rand(B, T, generator=g) < 0.03
        policy = torch.where(far, policy + 3.0 * torch.randn(B, T, generator=g), policy)
        pad = mask == 0
        for t in (logprobs, ref_logprobs, policy, entropy):
            t[pad] = float("nan")
    greedy = (torch.rand(G, generator=g) < 0.5).to(torch.float32)[gi]  # ReMax: one greedy reward per prompt
    values = 0.5 + 0.2 * torch.randn(B, T, generator=g)  # a critic's old values (GAE, the value loss)
    current = values + 0.3 * torch.randn(B, T, generator=g)  # its current values, some clipped
    pi = torch.exp(logprobs).clamp(max=1.0)
    sum_sq = pi * pi + (1 - pi) ** 2 * torch.rand(B, T, generator=g)  # Σπ² ≥ π² (OTB)
    if awkward:
        for t in (values, current, sum_sq):
            t[mask == 0] = float("nan")
    batch = RolloutBatch(
        prompt_ids=[int(i) for i in gi],
        group_index=gi,
        mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        extra={"policy_logprobs": policy.requires_grad_(), "policy_entropy": entropy.requires_grad_(),
               "greedy_baseline": greedy, "values": values, "current_values": current.requires_grad_(),
               "sum_pi_squared": sum_sq},
    )
    return {"batch": batch, "rewards": rewards, "token_reward": token_reward}


# ---------------------------------------------------------------------------------------------
# references: advantages (each with the stage's default parameters unless given)
# ---------------------------------------------------------------------------------------------


def _group_stats(r: torch.Tensor, gi: torch.Tensor):
    """(G,) count, sum, smallest and largest reward of each group (min/max in one scatter)."""
    G = int(gi.max()) + 1
    cnt = torch.bincount(gi, minlength=G).to(r.dtype)
    s = r.new_zeros(G).index_add_(0, gi, r)
    ext = r.new_full((G, 2), -INF).scatter_reduce_(0, gi[:, None].expand(-1, 2), torch.stack((r, -r), 1), "amax")
    return G, cnt, s, -ext[:, 1], ext[:, 0]


def ref_grpo(rewards, b, eps=1e-6):
    """A = (r − μ_g)/(σ_g + eps), σ sample std; singleton μ = 0, σ = 1; all-equal group 0."""
    gi = b.group_index
    r = rewards.to(torch.float32)
    G, cnt, s, lo, hi = _group_stats(r, gi)
    mean = s / cnt
    d = r - mean[gi]
    std = (d.new_zeros(G).index_add_(0, gi, d.square()) / (cnt - 1)).sqrt()
    one = cnt == 1
    flat = (lo == hi) & ~one
    centre = torch.where(flat, hi, torch.where(one, 0.0, mean))  # r − centre = 0 on a flat group, exactly
    scale = 1.0 / (torch.where(one, 1.0, std) + eps)
    return (r - centre[gi]) * scale[gi]


def ref_group_normalize(rewards, b):
    return ref_grpo(rewards, b, eps=1e-4)


def ref_rloo(rewards, b):
    """A = n/(n − 1)·(r − μ_g); singleton keeps r; all-equal group 0."""
    gi = b.group_index
    r = rewards.to(torch.float32)
    _, cnt, s, lo, hi = _group_stats(r, gi)
    one = cnt == 1
    centre = torch.where((lo == hi) & ~one, hi, torch.where(one, 0.0, s / cnt))
    factor = torch.where(one, 1.0, cnt / (cnt - 1))
    return (r - centre[gi]) * factor[gi]


def ref_opo(rewards, b):
    """A = r − Σ|y| r / Σ|y| over the group; singleton b = 0; all-equal group 0."""
    gi = b.group_index
    r = rewards.to(torch.float32)
    G, cnt, _, lo, hi = _group_stats(r, gi)
    lengths = b.mask.sum(-1)
    lw = torch.zeros(G, 2).index_add_(0, gi, torch.stack((lengths * r, lengths), 1))
    one = cnt == 1
    base = torch.where((lo == hi) & ~one, hi, torch.where(one, 0.0, lw[:, 0] / lw[:, 1].clamp(min=1)))
    return r - base[gi]


def ref_gpg(rewards, b):
    """A = α (r − μ_g), α = B / max(1, #{r ≠ 0}); singleton μ = 0; all-equal group 0."""
    gi = b.group_index
    r = rewards.to(torch.float32)
    _, cnt, s, lo, hi = _group_stats(r, gi)
    one = cnt == 1
    centre = torch.where((lo == hi) & ~one, hi, torch.where(one, 0.0, s / cnt))
    alpha = r.numel() / torch.count_nonzero(r).clamp(min=1).to(r.dtype)
    return alpha * (r - centre[gi])


def ref_maxrl(rewards, b, eps=1e-6):
    """A = (r − μ_g)/(μ_g + eps); singleton μ = 0; all-equal group 0. (Same as the stage wherever
    μ_g + eps ≠ 0, i.e. for non-negative rewards.)"""
    gi = b.group_index
    r = rewards.to(torch.float32)
    _, cnt, s, lo, hi = _group_stats(r, gi)
    mu = torch.where(cnt == 1, 0.0, s / cnt)
    centre = torch.where((lo == hi) & (cnt > 1), hi, mu)
    return (r - centre[gi]) / (mu + eps)[gi]


def ref_grpo_passk(rewards, b, eps=1e-6):
    """Only the first best response of each group: (r_max − r_2nd)/(σ_g + eps), 0 on a tie."""
    gi = b.group_index
    r = rewards.to(torch.float32)
    G, cnt, s, _, hi = _group_stats(r, gi)
    if bool((cnt < 2).any()):
        raise ValueError("pass@k needs at least 2 responses per group")
    d = r - (s / cnt)[gi]
    std = (d.new_zeros(G).index_add_(0, gi, d.square()) / (cnt - 1)).sqrt()
    B = r.numel()
    pos = torch.arange(B)
    star = torch.full((G,), B).scatter_reduce_(0, gi, torch.where(r == hi[gi], pos, B), "amin")  # (G,) row
    second = torch.full((G,), -INF).scatter_reduce_(0, gi, r.index_fill(0, star, -INF), "amax")
    gap = hi - second
    return r.new_zeros(B).index_copy_(0, star, torch.where(gap == 0, 0.0, gap / (std + eps)))


# Cost model behind the references (measured on the 2-core CPU of bench/README.md, torch 2.13
# CPU, (4096, 1024) float32): a float elementwise op or row sum ~0.4–1 ms; anything that reads a
# bool tensor as data (torch.where, masked_fill, bool × float, bool.sum() in int64) ~8–11 ms.
# So each reference masks an input that may hold NaN on padding with exactly one
# torch.where (the stages' NaN-safety contract), and masks values that are already finite
# there by multiplying with the 0/1 float mask; counts are sums of the float mask (a
# RolloutBatch mask is 0/1).


def _whiten_tok(x, m, eps, *, eps_at, finite=False):
    """(x − μ)/sqrt(σ² + eps) (or /(σ + eps)) over the entries with m > 0, sample variance,
    0 elsewhere and 0 everywhere when the valid entries are all equal (verl masked_whiten).
    ``finite``: x is already finite and 0 where m = 0 (no torch.where needed)."""
    xm = x if finite else torch.where(m > 0, x, 0.0)
    n = m.sum()
    if float(n) == 0:
        return torch.zeros_like(x)
    mean = xm.sum() / n
    d = (xm - mean) * m
    var = torch.dot(d.reshape(-1), d.reshape(-1)) / (n - 1).clamp(min=1)
    # all valid entries equal: fill the padding with one valid value, then min == max
    k = int(m.reshape(-1).argmax())
    lo, hi = torch.aminmax(xm + (1.0 - m) * xm.reshape(-1)[k])
    scale = torch.rsqrt(var + eps) if eps_at == "var" else 1.0 / (var.sqrt() + eps)
    return d * torch.where(lo < hi, scale, 0.0)


def ref_batch_whiten(values, b, eps=1e-4):
    """(x − μ)/(σ + eps) over the batch (a token signal: over its valid tokens); all equal → 0."""
    x = values.to(torch.float32)
    if x.dim() == 2:
        return _whiten_tok(x, b.mask, eps, eps_at="std")
    if x.numel() < 2:
        return torch.zeros_like(x)
    std, mean = torch.std_mean(x)
    lo, hi = torch.aminmax(x)
    return torch.where(lo < hi, (x - mean) / (std + eps), 0.0)


def _row_whiten(c, count, weight, extra_zero, eps):
    """Whitening of a token value that is c_i on ``weight_i`` valid tokens of row i and 0 on
    its other ``count_i − weight_i`` valid tokens (none unless ``extra_zero``), statistics over
    all valid tokens of the batch: computed per row. Returns (value on the c_i tokens, value on
    the zero tokens)."""
    N = count.sum()
    mean = (weight * c).sum() / N.clamp(min=1)
    sq = (weight * (c - mean).square()).sum()
    if extra_zero:
        sq = sq + (count - weight).sum() * mean.square()
    var = sq / (N - 1).clamp(min=1)
    present = weight > 0
    lo = torch.where(present, c, INF).amin()
    hi = torch.where(present, c, -INF).amax()
    if extra_zero:
        zeros = (count > weight).any()
        lo = torch.where(zeros, lo.clamp(max=0.0), lo)
        hi = torch.where(zeros, hi.clamp(min=0.0), hi)
    scale = torch.where(lo < hi, torch.rsqrt(var + eps), 0.0)
    return (c - mean) * scale, -mean * scale


def ref_reinforce_pp_baseline(rewards, b, eps=1e-8):
    """whiten((r − μ_g) on every valid token) over the batch's valid tokens: the value is one
    number per row, so the statistics are length-weighted row sums and (B, T) is written once."""
    gi, m = b.group_index, b.mask
    r = rewards.to(torch.float32)
    if r.dim() == 2:
        r = torch.where(m > 0, r, 0.0).sum(-1)
    _, cnt, s, lo, hi = _group_stats(r, gi)
    one = cnt == 1
    centre = torch.where((lo == hi) & ~one, hi, torch.where(one, 0.0, s / cnt))
    count = m.sum(-1)
    a, _ = _row_whiten(r - centre[gi], count, count, False, eps)
    return a[:, None] * m


def ref_reinforce_pp(rewards, b, gamma=1.0, eps=1e-8):
    """G_t = r_t + γ m_{t+1} G_{t+1}, whitened over all valid tokens (verl masked_whiten).

    A sequence reward sits at the last valid token L_i, so G = r_i γ^(L_i − t) on the run of
    valid tokens that ends the row, 0 on earlier runs (rows with holes). With γ = 1 and no
    holes that is r_i on every valid token: whitened per row, written once. A token reward:
    γ = 1 a reverse cumulative sum (minus its value at the next invalid position when there
    are holes); γ < 1 the recurrence over T on a contiguous (T, B) copy, two operations a
    step, written in place."""
    m = b.mask
    r = rewards.to(torch.float32)
    B, T = m.shape
    pos = torch.arange(T, dtype=torch.float32)
    count = m.sum(-1)
    L = (m * (pos + 1)).amax(-1) - 1  # last valid position, −1 for an empty row
    prefix = bool((L + 1 == count).all())  # no row has a hole before its last valid token
    if prefix:
        if r.dim() == 1:
            if gamma == 1.0:
                a, _ = _row_whiten(r, count, count, False, eps)
                return a[:, None] * m
            # the exponent is clamped at 0 on padding: γ^−k overflows there for γ below ~0.92
            G = r[:, None] * torch.pow(gamma, (L[:, None] - pos).clamp(min=0)) * m
            return _whiten_tok(G, m, eps, eps_at="var", finite=True)
        tok = torch.where(m > 0, r, 0.0)
        if gamma == 1.0:
            return _whiten_tok(tok.flip(-1).cumsum(-1).flip(-1), m, eps, eps_at="var", finite=True)
    else:  # general masks
        valid = m > 0
        # the last invalid position before L_i: the run that ends the row is (Z_i, L_i]
        Z = torch.where(valid | (pos >= L[:, None]), -1.0, pos).amax(-1)
        run = valid & (pos > Z[:, None])
        if r.dim() == 1:
            G = torch.where(run, r[:, None] * torch.pow(gamma, L[:, None] - pos), 0.0)
            return _whiten_tok(G, m, eps, eps_at="var", finite=True)
        tok = torch.where(valid, r, 0.0)
        if gamma == 1.0:
            C = tok.flip(-1).cumsum(-1).flip(-1)  # Σ_{s ≥ t}
            ipos = torch.arange(T)
            nxt = torch.where(valid, T, ipos).flip(-1).cummin(-1).values.flip(-1)  # first invalid ≥ t
            nxt = torch.cat((nxt[:, 1:], nxt.new_full((B, 1), T)), 1)  # first invalid > t
            G = C - torch.cat((C, C.new_zeros(B, 1)), 1).gather(1, nxt)
            return _whiten_tok(G * m, m, eps, eps_at="var", finite=True)
    tt, mt = tok.t().contiguous(), m.t().contiguous()
    Gt = torch.empty_like(tt)
    run = r.new_zeros(B)  # m_{t+1} G_{t+1}
    for t in range(T - 1, -1, -1):
        torch.add(tt[t], run, alpha=gamma, out=Gt[t])
        torch.mul(Gt[t], mt[t], out=run)
    return _whiten_tok(Gt.t().contiguous() * m, m, eps, eps_at="var", finite=True)


def ref_remax(rewards, b):
    """A = Σ_{k ≥ t} r m − b_i on valid tokens, 0 elsewhere. A sequence reward sits on the last
    valid token, so every valid token of row i gets r_i − b_i; a row without tokens is 0 even
    if its reward is NaN (the stage's contract: one row sum of the mask)."""
    m = b.mask
    base = b.extra["greedy_baseline"].to(torch.float32)
    r = rewards.to(torch.float32)
    if r.dim() == 1:
        return torch.where(m.sum(-1) > 0, r - base, 0.0)[:, None] * m
    G = torch.where(m > 0, r, 0.0).flip(-1).cumsum(-1).flip(-1)
    return (G - base[:, None]) * m


def _last_token(rewards, m):
    """A sequence reward on each row's last valid token (0 for an empty row)."""
    pos = torch.arange(1, m.shape[1] + 1, dtype=m.dtype)
    last = (m * pos).amax(-1).long() - 1
    out = torch.zeros_like(m)
    return out.scatter_(1, last.clamp(min=0)[:, None], torch.where(last >= 0, rewards, 0.0)[:, None])


def ref_gae(rewards, b, gamma=1.0, lam=1.0, eps=1e-8):
    """verl's compute_gae_advantage_return loop over T, then masked_whiten (mean, Bessel variance)."""
    m = b.mask
    v = torch.where(m > 0, b.extra["values"], 0.0)
    r = _last_token(rewards.to(torch.float32), m) if rewards.dim() == 1 else torch.where(m > 0, rewards, 0.0)
    B, T = m.shape
    rt, vt, mt = r.t().contiguous(), v.t().contiguous(), m.t().contiguous()
    adv, nxt, last = torch.empty_like(rt), r.new_zeros(B), r.new_zeros(B)
    for t in range(T - 1, -1, -1):
        a = rt[t] + gamma * nxt - vt[t] + gamma * lam * last
        nxt = torch.lerp(nxt, vt[t], mt[t])
        last = torch.lerp(last, a, mt[t])
        adv[t] = a
    adv = adv.t()
    valid = m > 0
    x = adv[valid]
    if x.numel() < 2 or bool(x.min() == x.max()):
        return torch.zeros_like(adv)
    out = (adv - x.mean()) * torch.rsqrt(x.var() + eps)
    return torch.where(valid, out, 0.0)


def ref_otb(rewards, b, eps=1e-8):
    """Per-position baseline Σ_i G·W / Σ_i W over each group (verl's loop, as scatters), zero tail."""
    m = b.mask
    gi = b.group_index
    G = int(gi.max()) + 1
    returns = _last_token(rewards.to(torch.float32), m).flip(-1).cumsum(-1).flip(-1)
    pi = torch.exp(torch.where(m > 0, b.logprobs, 0.0))
    w = ((1 - 2 * pi + torch.where(m > 0, b.extra["sum_pi_squared"], 0.0)) * m).cumsum(-1) * m
    num = m.new_zeros(G, m.shape[1]).index_add_(0, gi, returns * w)
    den = m.new_zeros(G, m.shape[1]).index_add_(0, gi, w)
    count = torch.bincount(gi, minlength=G)
    base = torch.where((count > 1)[gi][:, None], (num / (den + eps))[gi], 0.0)
    lengths = m.sum(-1)
    top = lengths.new_full((G,), -1.0).scatter_reduce(0, gi, lengths, "amax")
    at_top = lengths == top[gi]
    n_top = torch.bincount(gi[at_top], minlength=G)
    second = lengths.new_full((G,), -1.0).scatter_reduce(0, gi, torch.where(at_top, -1.0, lengths), "amax")
    lone = at_top & (n_top[gi] == 1) & (second[gi] >= 0)
    tail = lone[:, None] & (torch.arange(m.shape[1], dtype=m.dtype)[None, :] >= second[gi][:, None])
    return (returns - torch.where(tail, 0.0, base)) * m


def ref_value_loss(returns, b, clip=0.5):
    """½ · token-mean of max((V − R)², (V_old + clamp(V − V_old, ±c) − R)²)."""
    m = b.mask
    valid = m > 0
    v = torch.where(valid, b.extra["current_values"], 0.0)
    old = torch.where(valid, b.extra["values"], 0.0)
    target = torch.where(valid, returns, 0.0)
    err = torch.maximum((v - target) ** 2, (old + (v - old).clamp(-clip, clip) - target) ** 2)
    return 0.5 * (err * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# references: losses (defaults of each stage). A (B,) advantage stays a column: Σ_t first,
# then one multiply per row. The general branches (token-level advantages) are checked on the
# small batch, not timed.
# ---------------------------------------------------------------------------------------------


def _adv(advantages, valid, count):
    """A (B,) advantage as a (B, 1) column, 0 on a row without tokens (the stages' contract: an
    empty row's advantage may be NaN and must not leak in); a (B, T) one 0 on padding."""
    if advantages.dim() == 1:
        return torch.where(count > 0, advantages, 0.0)[:, None]
    return torch.where(valid, advantages, 0.0)


def _adv_dot(A, X):
    """Σ_{i,t} A X for A (B, 1) or (B, T): a row sum first when A is a column."""
    return (A[:, 0] * X.sum(-1)).sum() if A.shape[1] == 1 else (A * X).sum()


def _log_ratio(b, valid, other="logprobs"):
    """log π_θ − log π_old (or π_ref), 0 on padding: the one torch.where of a loss."""
    return torch.where(valid, b.extra["policy_logprobs"] - getattr(b, other), 0.0)


def _clip_bounds(A, lo, hi):
    """Per-sign ratio bounds: max(−A ρ, −A clip(ρ, lo, hi)) = −A clamp(ρ, lo', hi') with
    (lo', hi') = (lo, ∞) where A < 0, (−∞, hi) where A > 0, (−∞, ∞) where A = 0."""
    return torch.where(A < 0, lo, -INF), torch.where(A > 0, hi, INF)


def ref_ppo_clip(advantages, b, eps_low=0.2, eps_high=0.2, clip_c=3.0):
    """token-mean of max(−A ρ, −A clip(ρ)), dual clip min(·, −A c) where A < 0: per row one
    clamp of the log-ratio, A ≥ 0 to [−20, log(1 + eps_high)], A < 0 to [log(1 − eps_low),
    log c], then exp (the same values up to one rounding of exp∘log at a bound)."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    A = _adv(advantages, valid, count)
    neg = A < 0
    lo = torch.where(neg, math.log(1.0 - eps_low), -20.0)
    hi = torch.where(neg, math.log(clip_c) if clip_c else 20.0, math.log(1.0 + eps_high))
    w = _log_ratio(b, valid).clamp(lo, hi).exp()
    return -_adv_dot(A, w * m) / count.sum().clamp(min=1)


def ref_kl(b):
    """k3 = exp(−Δ) + Δ − 1 (Δ clamped ±20, k clamped ±10), token-mean; 0 on padding by Δ = 0."""
    m = b.mask
    d = _log_ratio(b, m > 0, "ref_logprobs").clamp(-20.0, 20.0)
    return (torch.expm1(-d) + d).clamp(-10.0, 10.0).sum() / m.sum().clamp(min=1)


def ref_gspo(advantages, b, eps_low=3e-4, eps_high=4e-4):
    """seq-mean-token-mean of max(−A s, −A clip(s)), s = exp(mean log-ratio) (value s, gradient
    s ∇log π per token). With a sequence advantage every token of a row has the same term, so
    the row is one term: len/(len + 1e-8) · (−A clamp(s)), s from the row sum of log-ratios,
    whose gradient is s/len per token, as the token form's."""
    m = b.mask
    valid = m > 0
    n = m.sum(-1)
    lr = _log_ratio(b, valid)
    if advantages.dim() == 1:
        A = advantages
        s = (lr.sum(-1) / n.clamp(min=1)).clamp(max=10.0).exp()
        lo, hi = _clip_bounds(A, 1.0 - eps_low, 1.0 + eps_high)
        per_seq = -A * s.clamp(lo, hi) * (n / (n + 1e-8))
    else:
        A = torch.where(valid, advantages, 0.0)
        seq = (lr.detach().sum(-1) / n.clamp(min=1))[:, None]
        s = (lr - lr.detach() + seq).clamp(max=10.0).exp()
        lo, hi = _clip_bounds(A, 1.0 - eps_low, 1.0 + eps_high)
        per_seq = (-A * s.clamp(lo, hi)).sum(-1) / (n + 1e-8)
    rows = n > 0
    return torch.where(rows, per_seq, 0.0).sum() / rows.sum().clamp(min=1)


def ref_sapo(advantages, b, tau_pos=1.0, tau_neg=1.05):
    """seq-mean-token-mean of −(4/τ) σ(τ(ρ − 1)) A, τ by the sign of A."""
    m = b.mask
    valid = m > 0
    n = m.sum(-1)
    A = _adv(advantages, valid, n)
    ratio = _log_ratio(b, valid).clamp(-20.0, 20.0).exp()
    tau = torch.where(A > 0, tau_pos, tau_neg)
    gate = torch.sigmoid((ratio - 1.0) * tau) * m
    coef = -4.0 * A / tau
    per_seq = (coef[:, 0] * gate.sum(-1) if A.shape[1] == 1 else (coef * gate).sum(-1)) / (n + 1e-8)
    rows = n > 0
    return torch.where(rows, per_seq, 0.0).sum() / rows.sum().clamp(min=1)


def ref_gpg_loss(advantages, b):
    """token-mean of −A log π."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    lp = torch.where(valid, b.extra["policy_logprobs"], 0.0)
    return -_adv_dot(_adv(advantages, valid, count), lp) / count.sum().clamp(min=1)


def ref_cispo(advantages, b, eps_low=0.2, eps_high=0.2):
    """token-mean of −sg(clip(ρ, 1 − eps_low, 1 + eps_high)) A log π (symmetric)."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    lp = torch.where(valid, b.extra["policy_logprobs"], 0.0)
    with torch.no_grad():
        w = _log_ratio(b, valid).exp().clamp(1.0 - eps_low, 1.0 + eps_high)
    return -_adv_dot(_adv(advantages, valid, count), w * lp) / count.sum().clamp(min=1)


def ref_clip_cov(advantages, b, eps_low=0.2, eps_high=0.2, cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0):
    """PPO clip (no dual clip), token-mean, with n random unclipped tokens of cov in (lb, ub)
    taken out: their terms are subtracted again (value and gradient cancel exactly)."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    N = count.sum()
    A = _adv(advantages, valid, count)
    ratio = _log_ratio(b, valid).exp()
    lo, hi = _clip_bounds(A, 1.0 - eps_low, 1.0 + eps_high)
    w = ratio.clamp(lo, hi)
    total = _adv_dot(A, w * m)
    with torch.no_grad():
        lpd = torch.where(valid, b.extra["policy_logprobs"], 0.0)
        a_mean = ((A[:, 0] * count).sum() if A.shape[1] == 1 else A.sum()) / (N + 1e-8)
        cov = (A - a_mean) * (lpd - lpd.sum() / (N + 1e-8))
        cand = valid & (w == ratio) & (cov > cov_lb) & (cov < cov_ub)
        index = torch.nonzero(cand.view(-1)).squeeze(-1)
    if index.numel() > 0:
        n = max(int(cov_ratio * N.item()), 1)
        chosen = index[torch.randperm(index.numel())[:n]]
        a_chosen = A[:, 0][chosen // w.shape[1]] if A.shape[1] == 1 else A.reshape(-1)[chosen]
        total = total - (a_chosen * w.reshape(-1)[chosen]).sum()
    return -total / N.clamp(min=1)


def _topk_indices(x, k, parts=8):
    """torch.topk(x, k).indices of a 1-D x as a set (order aside): top-k of ``parts`` equal
    chunks, then of their union. torch's CPU topk slows down sharply past ~2M elements
    (45 ms for k = 420 of 4M here, 5 ms chunked)."""
    n = x.numel()
    if n % parts or n // parts < k:
        return x.topk(k).indices
    v, i = x.view(parts, -1).topk(k, dim=-1)
    return (i + torch.arange(parts)[:, None] * (n // parts)).view(-1)[v.view(-1).topk(k).indices]


def ref_kl_cov(advantages, b, cov_ratio=2e-4, kl_coef=0.1):
    """token-mean of −A ρ, plus kl_coef |log ρ| on the top-k valid tokens by cov."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    N = count.sum()
    A = _adv(advantages, valid, count)
    lr = _log_ratio(b, valid)
    total = -_adv_dot(A, lr.exp() * m)
    with torch.no_grad():
        lpd = torch.where(valid, b.extra["policy_logprobs"], 0.0)
        a_mean = ((A[:, 0] * count).sum() if A.shape[1] == 1 else A.sum()) / N
        cov = torch.where(valid, (A - a_mean) * (lpd - lpd.sum() / N), -INF)
        k = max(1, int(int(N.item()) * cov_ratio))
        top = _topk_indices(cov.view(-1), k)
    if N.item() > 0:
        total = total + kl_coef * lr.reshape(-1)[top].abs().sum()
    return total / N.clamp(min=1)


def ref_gmpo(advantages, b, eps_low=0.4, eps_high=0.4):
    """mean over rows of −Ā_i exp(Σ_t clipped log-ratio / |y_i|); the pessimistic clip is one
    clamp with per-sign bounds (A > 0: ≤ eps_high; A < 0: ≥ −eps_low; A = 0: 0)."""
    m = b.mask
    valid = m > 0
    count = m.sum(-1)
    A = _adv(advantages, valid, count)
    lo = torch.where(A > 0, -INF, torch.where(A < 0, -eps_low, 0.0))
    hi = torch.where(A < 0, INF, torch.where(A > 0, eps_high, 0.0))
    n = count + 1e-8
    seq_adv = (A[:, 0] * count if A.shape[1] == 1 else A.sum(-1)) / n
    return (-seq_adv * (_log_ratio(b, valid).clamp(lo, hi).sum(-1) / n).exp()).mean()


def ref_entropy_bonus(b):
    """token-mean of the policy entropy."""
    m = b.mask
    return torch.where(m > 0, b.extra["policy_entropy"], 0.0).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# the cases: (row name, stage name, stage params, inputs, reference, kind)
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    stage: str
    kind: str  # "advantage" (forward) or "loss" (forward + backward)
    inputs: Callable[[dict], tuple]  # data -> positional inputs of the stage
    ref: Callable[..., Any]  # called with the same inputs
    params: dict | None = None
    seeded: bool = False  # the stage draws from the global torch generator


def _adv_in(key="rewards"):
    return lambda d: (d[key], d["batch"])


def _loss_in(d):
    return (d["advantages"], d["batch"])


def _grp_in(d):
    return (d["batch"],)


CASES = [
    Case("grpo", "grpo", "advantage", _adv_in(), ref_grpo),
    Case("group_normalize", "group_normalize", "advantage", _adv_in(), ref_group_normalize),
    Case("batch_whiten", "batch_whiten", "advantage", _adv_in(), ref_batch_whiten),
    Case("batch_whiten [tok signal]", "batch_whiten", "advantage", _adv_in("token_signal"), ref_batch_whiten),
    Case("rloo", "rloo", "advantage", _adv_in(), ref_rloo),
    Case("opo", "opo", "advantage", _adv_in(), ref_opo),
    Case("gpg", "gpg", "advantage", _adv_in(), ref_gpg),
    Case("grpo_passk", "grpo_passk", "advantage", _adv_in(), ref_grpo_passk),
    Case("maxrl", "maxrl", "advantage", _adv_in(), ref_maxrl),
    Case("reinforce_pp", "reinforce_pp", "advantage", _adv_in(), ref_reinforce_pp),
    Case("reinforce_pp [γ=0.99]", "reinforce_pp", "advantage", _adv_in(),
         lambda r, b: ref_reinforce_pp(r, b, gamma=0.99), params={"gamma": 0.99}),
    Case("reinforce_pp [tok reward]", "reinforce_pp", "advantage", _adv_in("token_reward"), ref_reinforce_pp),
    Case("reinforce_pp [tok, γ=0.99]", "reinforce_pp", "advantage", _adv_in("token_reward"),
         lambda r, b: ref_reinforce_pp(r, b, gamma=0.99), params={"gamma": 0.99}),
    Case("reinforce_pp_baseline", "reinforce_pp_baseline", "advantage", _adv_in(), ref_reinforce_pp_baseline),
    Case("remax", "remax", "advantage", _adv_in(), ref_remax),
    Case("remax [tok reward]", "remax", "advantage", _adv_in("token_reward"), ref_remax),
    Case("losses.ppo_clip", "losses.ppo_clip", "loss", _loss_in, ref_ppo_clip),
    Case("losses.kl", "losses.kl", "loss", _grp_in, ref_kl),
    Case("losses.gspo", "losses.gspo", "loss", _loss_in, ref_gspo),
    Case("losses.sapo", "losses.sapo", "loss", _loss_in, ref_sapo),
    Case("losses.gpg", "losses.gpg", "loss", _loss_in, ref_gpg_loss),
    Case("losses.cispo", "losses.cispo", "loss", _loss_in, ref_cispo),
    Case("losses.clip_cov", "losses.clip_cov", "loss", _loss_in, ref_clip_cov, seeded=True),
    Case("losses.kl_cov", "losses.kl_cov", "loss", _loss_in, ref_kl_cov),
    Case("losses.gmpo", "losses.gmpo", "loss", _loss_in, ref_gmpo),
    Case("losses.entropy_bonus", "losses.entropy_bonus", "loss", _grp_in, ref_entropy_bonus),
    Case("gae", "gae", "advantage", _adv_in(), ref_gae),
    Case("optimal_token_baseline", "optimal_token_baseline", "advantage", _adv_in(), ref_otb),
    Case("losses.value", "losses.value", "loss", lambda d: (d["returns"], d["batch"]), ref_value_loss),
]

def prepare(data: dict) -> dict:
    """Derived inputs: the grpo advantage the losses take, a token signal for batch_whiten."""
    b = data["batch"]
    reg = default_registry()
    if "grpo" in reg:
        st = reg["grpo"]
        adv = st.fn(data["rewards"], b, **st.params().model_dump())
    else:
        adv = ref_grpo(data["rewards"], b)
    g = torch.Generator().manual_seed(1)
    returns = torch.where(b.mask > 0, b.extra["values"], 0.0) + 0.1 * torch.randn(b.mask.shape, generator=g)
    return {**data, "advantages": adv.detach(), "token_signal": torch.randn(b.mask.shape, generator=g),
            "returns": returns}


def _leaves(b: RolloutBatch) -> list[torch.Tensor]:
    return [b.extra["policy_logprobs"], b.extra["policy_entropy"], b.extra["current_values"]]


def make_callables(case: Case, data: dict):
    """(stage(), reference()) closures, each returning what it computed (output, gradients)."""
    reg = default_registry()
    st = reg[case.stage]
    values = st.params(**(case.params or {})).model_dump()
    inputs = case.inputs(data)
    b = data["batch"]

    def wrap(fn):
        if case.kind != "loss":
            def run():
                return fn(), None
            return run

        leaves = _leaves(b)

        def run():
            for t in leaves:
                t.grad = None
            if case.seeded:
                torch.manual_seed(1234)
            out = fn()
            out.backward()
            return out.detach(), [None if t.grad is None else t.grad for t in leaves]

        return run

    return wrap(lambda: st.fn(*inputs, **values)), wrap(lambda: case.ref(*inputs))


def compare(a, b) -> tuple[float, float, bool]:
    """(max |diff| of the outputs, max |diff| of the gradients relative to their max, close?)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    diff = (out_a - out_b).abs()
    nan_same = torch.equal(out_a.isnan(), out_b.isnan())
    d_out = float(diff[~diff.isnan()].max()) if diff.numel() and bool((~diff.isnan()).any()) else 0.0
    ok = nan_same and torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5, equal_nan=True)
    d_grad = 0.0
    for ga, gb in zip(grads_a or [], grads_b or []):
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        ok = ok and bool(torch.isfinite(ga).all()) == bool(torch.isfinite(gb).all())
        scale = float(ga.abs().max()) or 1.0
        d = float((ga - gb).abs().max()) / scale
        d_grad = max(d_grad, d)
        ok = ok and d <= 1e-4
    return d_out, d_grad, ok


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of all CPUs, busy ticks of this process), from /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(own[11]) + int(own[12])  # all but idle and iowait; utime + stime
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class BusyGuard:
    """Retakes a sample during which other processes used the CPU.

    On a shared 2-core machine another process's burst takes a core from torch's two threads,
    and a parallel op then waits for its descheduled half: calls slow down by whole scheduler
    slices (a 0.1 ms stage measured 25 ms in such a burst), for stage and reference alike but
    not by the same factor. A sample is busy when the CPU time of all other processes during it
    (/proc/stat's busy ticks minus this process's own) exceeds ``share`` of its wall time; it is
    then taken again after a pause, for up to ``wait`` seconds, and kept as it is after that
    (counted in ``kept``). ``retaken`` counts the retakes. Off where /proc is missing."""

    share: float = 0.05
    wait: float = 120.0
    retaken: int = 0
    kept: int = 0

    def sample(self, fn: Callable[[], Any], n: int) -> float:
        """Seconds per call of ``fn``, averaged over ``n`` calls in a quiet moment."""
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        give_up = time.perf_counter() + self.wait
        while True:
            before = _cpu_ticks()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            wall = time.perf_counter() - t0
            after = _cpu_ticks()
            if before is None or after is None or self.share <= 0:
                return wall / n
            foreign = ((after[0] - before[0]) - (after[1] - before[1])) / hz  # seconds of other processes
            if foreign <= self.share * wall + 2.0 / hz:  # (ticks are counted at the clock's resolution)
                return wall / n
            if time.perf_counter() > give_up:
                self.kept += 1
                return wall / n
            self.retaken += 1
            time.sleep(0.5)


def time_pair(stage, ref, repeats: int, min_sample: float, guard: BusyGuard | None = None
              ) -> tuple[list[float], list[float]]:
    """Per-call seconds of each, ``repeats`` samples, alternating A B, B A, ..."""
    guard = guard or BusyGuard(share=0.0)
    inner = {}
    for fn in (stage, ref):
        fn()  # warm-up (allocator, lazy init)
        fn()
        t0 = time.perf_counter()
        fn()
        inner[fn] = max(1, int(min_sample / max(time.perf_counter() - t0, 1e-7)))
    ts, tr = [], []
    for i in range(repeats):
        order = ((stage, ts), (ref, tr)) if i % 2 == 0 else ((ref, tr), (stage, ts))
        for fn, acc in order:
            acc.append(guard.sample(fn, inner[fn]))
    return ts, tr


def self_check(names: list[Case]) -> list[str]:
    """References against stages on the awkward small batch (and a token-level advantage)."""
    failures = []
    batches = [prepare(make_batch(300, 48, awkward=True, seed=3)),  # holes inside rows
               prepare(make_batch(300, 48, awkward=True, holes=False, seed=6))]  # prefix masks, empty rows
    passk = [prepare(make_batch(64, 16, seed=4))]  # pass@k raises on a singleton: a batch without one
    for case in names:
        for d in (passk if case.stage == "grpo_passk" else batches):
            variants = [d]
            if case.kind == "loss" and case.inputs is _loss_in:
                b = d["batch"]
                noise = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(5))
                tok_adv = torch.where(b.mask > 0, noise, 0.0)
                variants.append({**d, "advantages": tok_adv})
            for v in variants:
                s, r = make_callables(case, v)
                d_out, d_grad, ok = compare(s(), r())
                if not ok:
                    failures.append(f"{case.name}: out diff {d_out:.3g}, grad diff {d_grad:.3g}"
                                    f"{' (token advantage)' if v is not d else ''}")
    return failures


# ---------------------------------------------------------------------------------------------
# --profile: where a stage's (and its reference's) time goes, by source line
# ---------------------------------------------------------------------------------------------


def profile_case(case: Case, data: dict, calls: int = 3) -> None:
    """Print where the stage's time goes, then the reference's: forward time per source line
    (exclusive, from sys.settrace line events) and, for a loss, backward time per autograd node,
    attributed to the forward line that made the node (anomaly-mode tracebacks). Per call,
    after one untraced warm-up call; tracing adds a little to each line."""
    import collections
    import linecache
    import warnings

    reg = default_registry()
    st = reg[case.stage]
    values = st.params(**(case.params or {})).model_dump()
    inputs = case.inputs(data)
    b = data["batch"]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    here = str(Path(__file__).resolve())
    harness = {"profile_case", "measure", "call", "main", "<module>", "<lambda>"}

    def ours_file(path: str, func: str) -> bool:
        return "/shapeflow/" in path or (path == here and func not in harness)

    def ours(frame) -> bool:
        return ours_file(frame.f_code.co_filename, frame.f_code.co_name)

    def where(frame) -> tuple:
        """The chain of our frames (outermost first) down to this one's current line."""
        chain = []
        while frame is not None and ours(frame):
            chain.append((frame.f_code.co_filename.replace(root, ""), frame.f_lineno))
            frame = frame.f_back
        return tuple(reversed(chain))

    def node_line(node) -> tuple:
        chain = []
        for entry in node.metadata.get("traceback_", []):
            for part in entry.split("File ")[1:]:
                if ", line " not in part or '"' not in part:
                    continue
                path = part.split('"')[1]
                func = part.split(", in ")[1].split()[0] if ", in " in part else ""
                if ours_file(path, func):
                    chain.append((path.replace(root, ""), int(part.split(", line ")[1].split(",")[0])))
        return tuple(chain) or (("(no source line)", 0),)

    def measure(fn):
        fwd: collections.Counter = collections.Counter()
        bwd: collections.Counter = collections.Counter()
        state: dict[str, Any] = {"key": None, "t": 0.0}

        def tracer(frame, event, arg):
            if not ours(frame):
                return None
            now = time.perf_counter()
            if state["key"] is not None:
                fwd[state["key"]] += now - state["t"]
            if event == "return":
                up = frame.f_back
                state["key"] = where(up) if up is not None and ours(up) else None
            else:
                state["key"] = where(frame)
            state["t"] = time.perf_counter()
            return tracer

        def call():
            for t in _leaves(b):
                t.grad = None
            if case.seeded:
                torch.manual_seed(1234)
            return fn()

        out = call()  # warm-up
        if case.kind == "loss":
            out.backward()
        for _ in range(calls):
            state["key"] = None
            sys.settrace(tracer)
            try:
                out = call()
            finally:
                sys.settrace(None)
            if case.kind != "loss":
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # anomaly mode's own warning
                with torch.autograd.detect_anomaly(check_nan=False):
                    out = call()
            seen, todo, starts = set(), [out.grad_fn], {}
            while todo:
                node = todo.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                line = node_line(node)

                def pre(grads, node=node):
                    starts[node] = time.perf_counter()

                def post(gin, gout, node=node, line=line):
                    bwd[line] += time.perf_counter() - starts[node]

                node.register_prehook(pre)
                node.register_hook(post)
                todo.extend(f for f, _ in node.next_functions)
            out.backward()
            seen.clear()  # let the graph (and its saved tensors) go before the next call
            starts.clear()
            del out, node
        return fwd, bwd

    def show(who, title, counter):
        total = sum(counter.values()) / calls * 1e3
        print(f"# {case.name} ({who}): {title}, {total:.1f} ms per call")
        for chain, sec in counter.most_common(14):
            path, line = chain[-1]
            src = linecache.getline(root + path, line).strip() if line else ""
            via = " < ".join(f"{Path(p).name}:{n}" for p, n in reversed(chain))
            print(f"  {sec / calls * 1e3:8.2f} ms  {via}  {src[:90]}")

    for who, fn in (("stage", lambda: st.fn(*inputs, **values)), ("reference", lambda: case.ref(*inputs))):
        fwd, bwd = measure(fn)
        show(who, "forward by line (exclusive)", fwd)
        if case.kind == "loss":
            show(who, "backward by the forward line of each autograd node", bwd)


def keep_freed_memory() -> bool:
    """glibc only: serve large blocks from the heap and never trim it (mallopt), so a freed
    (B, T) tensor's pages are reused instead of being unmapped and page-faulted in again on the
    next call. With the default thresholds that cost depends on the process's history (the same
    stage measured 22 or 65 ms per call); with this it is gone for stage and reference alike."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="responses B (default 4096)")
    p.add_argument("--tokens", type=int, default=1024, help="padded tokens T (default 1024)")
    p.add_argument("--group", type=int, default=8, help="responses per group (default 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed samples of each (default 7)")
    p.add_argument("--min-sample", type=float, default=0.2, help="seconds per sample, at least (default 0.2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2; 0 leaves torch's default)")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="reuse (default): keep freed memory in the heap (glibc mallopt), so page faults of "
                   "fresh 16 MB blocks do not blur the timings; default: leave glibc's thresholds")
    p.add_argument("--busy-share", type=float, default=0.05,
                   help="retake a sample during which other processes used more CPU than this share of its "
                   "wall time (from /proc; default 0.05; 0 turns the check off)")
    p.add_argument("--busy-wait", type=float, default=120.0,
                   help="seconds to keep retaking one busy sample before keeping it (default 120)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="only this stage (a registry name or a row name); repeatable")
    p.add_argument("--no-check", action="store_true", help="skip the small-batch reference check")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: the stages' time by source line (use with --only)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "glibc default"
    if args.malloc == "reuse":
        malloc = "glibc heap reuse (mallopt)" if keep_freed_memory() else "default (mallopt unavailable)"
    reg = default_registry()
    known = {c.stage for c in CASES}
    cases = [c for c in CASES if not args.only or c.stage in args.only or c.name in args.only]
    unknown = [n for n in args.only or [] if not any(n in (c.stage, c.name) for c in CASES)]
    if unknown:
        print(f"# no row or stage named: {', '.join(unknown)} (rows: {', '.join(c.name for c in CASES)})")
    missing = sorted({c.stage for c in cases if c.stage not in reg})
    cases = [c for c in cases if c.stage in reg]
    uncovered = sorted(n for n in reg.names() if reg[n].kind in ("advantage", "loss") and n not in known)

    print(f"# bench/stages.py  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, python {platform.python_version()}, "
          f"malloc: {malloc}")
    print(f"# batch: B={args.rows} responses in groups of {args.group} (shuffled), T={args.tokens}, "
          f"repeats={args.repeats}, ≥{args.min_sample}s per sample, median per call"
          + (f", samples retaken while other processes use > {args.busy_share:g} of a core" if args.busy_share > 0 else ""),
          flush=True)
    if missing:
        print(f"# not in the registry (skipped): {', '.join(missing)}")
    if uncovered:
        print(f"# in the registry without a reference here: {', '.join(uncovered)}")

    if args.profile:
        data = prepare(make_batch(args.rows, args.tokens, args.group))
        for case in cases:
            profile_case(case, data)
        return 0

    if not args.no_check:
        failures = self_check(cases)
        print("# reference check on the awkward batch: " + ("all agree" if not failures else "FAILED"))
        for f in failures:
            print(f"#   {f}")

    data = prepare(make_batch(args.rows, args.tokens, args.group))
    rows = []
    print(f"| {'stage':<28} | {'stage ms':>9} | {'ref ms':>9} | {'ratio':>7} | {'max abs diff':>12} "
          f"| {'grad diff':>9} |")
    print(f"|{'-' * 30}|{'-' * 10}:|{'-' * 10}:|{'-' * 8}:|{'-' * 13}:|{'-' * 10}:|")
    guard = BusyGuard(share=args.busy_share, wait=args.busy_wait)
    for case in cases:
        stage, ref = make_callables(case, data)
        d_out, d_grad, ok = compare(stage(), ref())
        retaken, kept = guard.retaken, guard.kept
        ts, tr = time_pair(stage, ref, args.repeats, args.min_sample, guard)
        ms, mr = statistics.median(ts) * 1e3, statistics.median(tr) * 1e3
        ratio = ms / mr
        flag = " !" if ratio > TARGET else "  "
        g = f"{d_grad:.1e}" if case.kind == "loss" else "-"
        print(f"| {case.name:<28} | {ms:9.3f} | {mr:9.3f} | {ratio:5.2f}{flag} | {d_out:12.1e} | {g:>9} |"
              + ("" if ok else "  MISMATCH"), flush=True)
        rows.append({"stage": case.name, "registry": case.stage, "kind": case.kind, "stage_ms": ms, "ref_ms": mr,
                     "ratio": ratio, "max_abs_diff": d_out, "grad_rel_diff": d_grad if case.kind == "loss" else None,
                     "agree": ok, "stage_samples_ms": [t * 1e3 for t in ts], "ref_samples_ms": [t * 1e3 for t in tr],
                     "busy_retaken": guard.retaken - retaken, "busy_kept": guard.kept - kept})
    over = [r["stage"] for r in rows if r["ratio"] > TARGET]
    print(f"# above {TARGET}×: {', '.join(over) if over else 'none'}")
    if args.busy_share > 0:
        busy = [f"{r['stage']} ({r['busy_kept']})" for r in rows if r["busy_kept"]]
        print(f"# samples retaken because other processes used the CPU: {guard.retaken}; kept busy after "
              f"{args.busy_wait:g} s: {guard.kept}" + (f" ({', '.join(busy)})" if busy else ""))
    if args.json:
        print(json.dumps({"rows": rows, "missing": missing, "threads": torch.get_num_threads(),
                          "B": args.rows, "T": args.tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
