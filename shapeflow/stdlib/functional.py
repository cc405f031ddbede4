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


def aggregate(loss: "Tensor", mask: "Tensor", mode: str, loss_scale_factor: float | None = None) -> "Tensor":
    """Reduce a per-token loss (B, T) to a scalar, as verl's ``agg_loss`` (catalog B11).

    token-mean               Σ ℓm / Σ m
    seq-mean-token-sum       mean over non-empty rows of Σ_t ℓm
    seq-mean-token-mean      mean over non-empty rows of Σ_t ℓm / (|y_i| + 1e-8)
    seq-mean-token-sum-norm  Σ ℓm / loss_scale_factor (default: the padded length T)
    Padding is excluded with ``where``, so a NaN there cannot leak in. An all-padding batch
    gives 0 rather than NaN (the denominators are clamped at 1).
    """
    lm = torch.where(mask > 0, loss, torch.zeros_like(loss))
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
