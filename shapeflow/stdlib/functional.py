"""Vectorised helpers shared by stages: group statistics, token broadcasting, loss aggregation.

Shapes: B responses, T padded tokens, G groups. ``mask`` is (B, T) with 1 on response tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shapeflow._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def group_sum(x: "Tensor", index: "Tensor", num_groups: int) -> "Tensor":
    """(G,) sum of ``x`` (B,) over each group."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def group_count(index: "Tensor", num_groups: int, dtype) -> "Tensor":
    """(G,) number of responses in each group."""
    return torch.bincount(index, minlength=num_groups).to(dtype)


def group_mean_std(x: "Tensor", index: "Tensor", num_groups: int, *, unbiased: bool) -> tuple["Tensor", "Tensor", "Tensor"]:
    """(G,) mean, std and count of ``x`` (B,) per group. A one-response group has std nan
    when ``unbiased`` (as torch.std of one value); callers decide what that means."""
    count = group_count(index, num_groups, x.dtype)
    mean = group_sum(x, index, num_groups) / count
    sq = group_sum((x - mean[index]) ** 2, index, num_groups)
    var = sq / (count - 1) if unbiased else sq / count
    return mean, var.sqrt(), count


def group_all_equal(x: "Tensor", index: "Tensor", num_groups: int) -> "Tensor":
    """(G,) true where a group has at least two responses and all its values of ``x`` (B,) are
    equal (compared exactly, with min == max, not through a rounded mean or std)."""
    inf = torch.full((num_groups,), float("inf"), dtype=x.dtype, device=x.device)
    lo = inf.scatter_reduce(0, index, x, "amin", include_self=True)
    hi = (-inf).scatter_reduce(0, index, x, "amax", include_self=True)
    return (lo == hi) & (torch.bincount(index, minlength=num_groups) > 1)


def to_tokens(x: "Tensor", mask: "Tensor") -> "Tensor":
    """A sequence-level (B,) or token-level (B, T) value as (B, T), zero on padding.

    Padding is zeroed with ``where``, not a product, so a NaN or inf there becomes 0 and its
    gradient is 0 rather than NaN."""
    if x.dim() == 1:
        x = x[:, None].expand_as(mask)
    return torch.where(mask > 0, x, torch.zeros_like(x))


def aggregate(loss: "Tensor", mask: "Tensor", mode: str, loss_scale_factor: float | None = None, *,
              finite: bool = False) -> "Tensor":
    """Reduce a per-token loss (B, T) to a scalar, as verl's ``agg_loss`` (catalog B11).

    token-mean               Σ ℓm / Σ m
    seq-mean-token-sum       mean over non-empty rows of Σ_t ℓm
    seq-mean-token-mean      mean over non-empty rows of Σ_t ℓm / (|y_i| + 1e-8)
    seq-mean-token-sum-norm  Σ ℓm / loss_scale_factor (default: the padded length T)
    Padding is excluded with ``where``, so a NaN there cannot leak in. An all-padding batch
    gives 0 rather than NaN (the denominators are clamped at 1). ``finite`` promises the loss
    is finite on padding, so a multiply by the mask (cheaper than ``where``) is safe.
    """
    lm = loss * mask if finite else torch.where(mask > 0, loss, torch.zeros_like(loss))
    if mode == "token-mean":
        out = lm.sum() / mask.sum().clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(mask.shape[-1])
        out = lm.sum() / norm
    else:
        lengths = mask.sum(-1)
        rows = (lengths > 0).to(loss.dtype)
        if mode == "seq-mean-token-sum":
            per_seq = lm.sum(-1)
        elif mode == "seq-mean-token-mean":
            per_seq = lm.sum(-1) / (lengths + 1e-8)
        else:
            raise ValueError(f"unknown aggregation mode {mode!r}")
        out = (per_seq * rows).sum() / rows.sum().clamp(min=1)
    out.terms = lm  # the per-token terms, for `replay --objective` (not used by training)
    return out


def group_min_max(x: "Tensor", index: "Tensor", num_groups: int) -> tuple["Tensor", "Tensor"]:
    """(G,) smallest and largest value of ``x`` (B,) in each group (+inf / −inf for an empty group)."""
    inf = torch.full((num_groups,), float("inf"), dtype=x.dtype, device=x.device)
    lo = inf.scatter_reduce(0, index, x, "amin", include_self=True)
    hi = (-inf).scatter_reduce(0, index, x, "amax", include_self=True)
    return lo, hi


def group_loo_std(x: "Tensor", index: "Tensor", num_groups: int, *, unbiased: bool) -> "Tensor":
    """(B,) std of the *other* responses of each response's group (leave-one-out).

    For response i of a group of n: the std of the n − 1 values x_j, j ≠ i, with divisor n − 2
    (``unbiased``, NeMo-RL's Bessel-corrected leave-one-out std) or n − 1. Computed from the
    group's centred sum of squares by the downdate M2₋ᵢ = M2 − (x_i − μ)²·n/(n − 1), never by
    a Python loop. Where the others are all equal (found exactly, through the group's min, max
    and their counts), and where it is undefined (n ≤ 2 with ``unbiased``, n = 1), it is 0."""
    mean, _, count = group_mean_std(x, index, num_groups, unbiased=False)
    n = count[index]
    d = x - mean[index]
    m2 = group_sum(d * d, index, num_groups)[index]
    others_m2 = (m2 - d * d * n / (n - 1).clamp(min=1)).clamp(min=0)
    dof = n - 2 if unbiased else n - 1
    std = (others_m2 / dof.clamp(min=1)).sqrt()
    # the others are all equal: the group is flat, or x_i is the only value unlike the rest
    lo, hi = group_min_max(x, index, num_groups)
    c_lo = group_sum((x == lo[index]).to(x.dtype), index, num_groups)[index]
    c_hi = group_sum((x == hi[index]).to(x.dtype), index, num_groups)[index]
    lo_i, hi_i = lo[index], hi[index]
    others_equal = (
        (lo_i == hi_i)
        | ((x == hi_i) & (c_hi == 1) & (c_lo == n - 1))
        | ((x == lo_i) & (c_lo == 1) & (c_hi == n - 1))
    )
    return torch.where(others_equal | (dof < 1), torch.zeros_like(std), std)


def _whiten_scale(var: "Tensor", eps: float, eps_at: str) -> "Tensor":
    """1 / sqrt(σ² + eps) (verl) or 1 / (σ + eps) (TRL)."""
    if eps_at == "var":
        return torch.rsqrt(var + eps)
    if eps_at == "std":
        return 1.0 / (var.sqrt() + eps)
    raise ValueError(f"unknown eps_at {eps_at!r}")


def masked_whiten(
    x: "Tensor", mask: "Tensor", *, eps: float = 1e-8, unbiased: bool = True, eps_at: str = "var"
) -> "Tensor":
    """``x`` (B,) or (B, T) whitened with the mean and std of its valid entries, 0 elsewhere.

        eps_at = "var":  (x − μ) / sqrt(σ² + eps)     verl ``masked_whiten`` (eps 1e-8)
        eps_at = "std":  (x − μ) / (σ + eps)          TRL (eps 1e-4)

    μ and σ cover every entry where ``mask`` > 0 in the whole tensor (all valid tokens of the
    batch, not one row); σ² is Bessel-corrected (``unbiased``, as verl ``masked_var``) or not.
    Where all valid entries are equal (compared exactly, min == max), and so also with fewer
    than two of them, the result is exactly 0 (verl raises on a single valid token). Invalid
    entries are excluded with ``where``: a NaN there cannot leak in.

    verl's ``masked_mean`` divides by Σm + 1e-8; the 1e-8 is left out here (it changes the mean
    by a relative 1e-8/N, below float32 resolution)."""
    valid = mask > 0
    zero = torch.zeros_like(x)
    n = valid.sum().to(x.dtype)
    mean = torch.where(valid, x, zero).sum() / n.clamp(min=1)
    d = torch.where(valid, x - mean, zero)
    dof = n - 1 if unbiased else n
    var = (d * d).sum() / dof.clamp(min=1)
    scale = _whiten_scale(var, eps, eps_at)
    lo = torch.where(valid, x, torch.full_like(x, float("inf"))).amin() if x.numel() else x.new_zeros(())
    hi = torch.where(valid, x, torch.full_like(x, -float("inf"))).amax() if x.numel() else x.new_zeros(())
    flat = lo >= hi  # all valid entries equal, or none valid
    return torch.where(valid & ~flat, d * scale, zero)


def masked_whiten_rows(
    c: "Tensor", mask: "Tensor", *, eps: float = 1e-8, unbiased: bool = True, eps_at: str = "var"
) -> "Tensor":
    """``masked_whiten`` of a value that is constant along each row: c_i on every valid token
    of row i. The same statistics from B numbers weighted by the rows' token counts
    n_i = Σ_t m_{i,t}, instead of B × T entries:

        μ = Σ n_i c_i / N,  σ² = Σ n_i (c_i − μ)² / (N − 1),  A_{i,t} = (c_i − μ) / sqrt(σ² + eps) · m_{i,t}

    with the same all-equal rule (exactly 0 when every row with tokens has the same c)."""
    n = (mask > 0).to(c.dtype).sum(-1)  # (B,)
    has = n > 0
    c0 = torch.where(has, c, torch.zeros_like(c))
    total = n.sum()
    mean = (n * c0).sum() / total.clamp(min=1)
    d = torch.where(has, c0 - mean, torch.zeros_like(c0))
    dof = total - 1 if unbiased else total
    var = (n * d * d).sum() / dof.clamp(min=1)
    scale = _whiten_scale(var, eps, eps_at)
    inf = torch.full_like(c0, float("inf"))
    flat = torch.where(has, c0, inf).amin() >= torch.where(has, c0, -inf).amax() if c.numel() else True
    row = torch.where(has & ~torch.as_tensor(flat), d * scale, torch.zeros_like(d))  # (B,)
    return row[:, None] * (mask > 0).to(c.dtype)


def no_holes(mask: "Tensor") -> bool:
    """Every row's valid tokens form one prefix (nothing masked before its last valid token)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
    return bool(((mask * positions).amax(-1) == mask.sum(-1)).all())


def place_at_last_token(x: "Tensor", mask: "Tensor") -> "Tensor":
    """A sequence value (B,) as a token value (B, T): x_i at row i's last valid token, 0
    elsewhere (verl writes the score at ``valid_response_length − 1``). A token value (B, T)
    is returned with its padding zeroed. Rows without valid tokens get nothing."""
    valid = mask > 0
    if x.dim() == 2:
        return torch.where(valid, x, torch.zeros_like(x))
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(valid, pos, torch.full_like(pos, -1)).amax(-1)  # (B,), −1 for an empty row
    at_last = pos == last[:, None]
    return torch.where(at_last & valid, x[:, None].expand_as(mask), torch.zeros(mask.shape, dtype=x.dtype, device=x.device))


def discounted_returns(rewards: "Tensor", mask: "Tensor", gamma: float) -> "Tensor":
    """(B, T) reward-to-go G_t = r_t + γ·m_{t+1}·G_{t+1}, as verl's REINFORCE++ loop.

    The running return is reset to 0 after every position outside ``mask`` (padding, or a
    masked tool span), so nothing flows back across it. One pass over T with (B,) tensor
    operations: vectorised over the batch. Positions outside ``mask`` keep their raw value; a
    caller masks them."""
    B, T = rewards.shape
    r = rewards.t().contiguous()  # (T, B): each step reads and writes one contiguous row
    m = (mask > 0).to(rewards.dtype).t().contiguous()
    out = torch.empty_like(r)
    running = rewards.new_zeros(B)
    for t in range(T - 1, -1, -1):
        running = r[t] + gamma * running
        out[t] = running
        running = running * m[t]
    return out.t().contiguous()
