"""Vectorised helpers shared by stages: group statistics, token broadcasting, loss aggregation.

Shapes: B responses, T padded tokens, G groups. ``mask`` is (B, T), 1 on response tokens and 0
elsewhere (a RolloutBatch's mask), so it also serves as the 0/1 weight of a product and its
row sums are the response lengths.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from typing import TYPE_CHECKING, Callable

from shapeflow._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def group_sum(x: "Tensor", index: "Tensor", num_groups: int) -> "Tensor":
    """(G,) sum of ``x`` (B,) over each group."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def group_count(index: "Tensor", num_groups: int, dtype) -> "Tensor":
    """(G,) number of responses in each group."""
    return torch.bincount(index, minlength=num_groups).to(dtype)


class GroupStats:
    """(G,) per-group count, sum, smallest and largest value (+inf / −inf for an empty group),
    and what the group estimators derive from them (each computed once, when first asked)."""

    def __init__(self, count: "Tensor", total: "Tensor", lo: "Tensor", hi: "Tensor"):
        self.count, self.total, self.lo, self.hi = count, total, lo, hi

    @cached_property
    def mean(self) -> "Tensor":
        return self.total / self.count

    @cached_property
    def one(self) -> "Tensor":
        """(G,) a group of one response."""
        return self.count == 1

    @cached_property
    def flat(self) -> "Tensor":
        """(G,) two or more responses whose values are all equal (compared exactly, min == max)."""
        return (self.lo == self.hi) & (self.count > 1)

    def centre(self, baseline: "Tensor | None" = None) -> "Tensor":
        """(G,) what a group-relative estimator subtracts: the group's ``baseline`` (default its
        mean); 0 for a group of one response (verl); for a flat group its common value, so that
        x − centre is exactly 0 there (never a rounding residue of a mean)."""
        base = self.mean if baseline is None else baseline
        # lo == hi: a flat group, or a group of one (whose centre is 0)
        return torch.where(self.lo == self.hi, torch.where(self.one, 0.0, self.hi), base)


def group_stats(x: "Tensor", index: "Tensor", num_groups: int) -> GroupStats:
    """Count, sum, min and max of ``x`` (B,) per group: a bincount, an index_add and one scatter
    (the min as the max of −x, beside the max)."""
    count = group_count(index, num_groups, x.dtype)
    total = group_sum(x, index, num_groups)
    ext = x.new_full((num_groups, 2), -float("inf"))
    ext = ext.scatter_reduce_(0, index[:, None].expand(-1, 2), torch.stack((x, -x), 1), "amax")
    return GroupStats(count, total, -ext[:, 1], ext[:, 0])


def group_mean_std(x: "Tensor", index: "Tensor", num_groups: int, *, unbiased: bool) -> tuple["Tensor", "Tensor", "Tensor"]:
    """(G,) mean, std and count of ``x`` (B,) per group. A one-response group has std nan
    when ``unbiased`` (as torch.std of one value); callers decide what that means."""
    count = group_count(index, num_groups, x.dtype)
    mean = group_sum(x, index, num_groups) / count
    return mean, group_std(x, index, num_groups, mean, count, unbiased=unbiased), count


def group_std(x: "Tensor", index: "Tensor", num_groups: int, mean: "Tensor", count: "Tensor", *,
              unbiased: bool) -> "Tensor":
    """(G,) std of ``x`` (B,) per group, given the groups' mean and count (two-pass: the sum of
    squared deviations from the mean)."""
    d = x - mean[index]
    sq = group_sum(d * d, index, num_groups)
    return (sq / (count - 1) if unbiased else sq / count).sqrt()


def group_all_equal(x: "Tensor", index: "Tensor", num_groups: int) -> "Tensor":
    """(G,) true where a group has at least two responses and all its values of ``x`` (B,) are
    equal (compared exactly, with min == max, not through a rounded mean or std)."""
    return group_stats(x, index, num_groups).flat


def masked(x: "Tensor", valid: "Tensor") -> "Tensor":
    """``x`` with 0 wherever ``valid`` (bool, broadcastable) is false.

    A ``where``, not a product: a NaN or inf there becomes 0 and its gradient is 0 rather
    than NaN. Mask each input that may hold such values once, before any arithmetic."""
    return torch.where(valid, x, 0.0)


def to_tokens(x: "Tensor", mask: "Tensor") -> "Tensor":
    """A sequence-level (B,) or token-level (B, T) value as (B, T), zero on padding.

    Padding is zeroed with ``where``, not a product, so a NaN or inf there becomes 0 and its
    gradient is 0 rather than NaN. (Losses keep a sequence value as a (B, 1) column instead:
    ``advantage_weight``.)"""
    if x.dim() == 1:
        x = x[:, None].expand_as(mask)
    return torch.where(mask > 0, x, torch.zeros_like(x))


def advantage_weight(advantages: "Tensor", valid: "Tensor", lengths: "Tensor", dtype=None) -> "Tensor":
    """An advantage shaped to multiply a per-token (B, T) term: a sequence value (B,) as a
    (B, 1) column, 0 on a row without tokens; a token value (B, T) with 0 on padding. Both by
    ``where``, so a NaN or inf there reaches neither value nor gradient, and neither is ever
    materialised as more than it is (a column broadcasts; ``aggregate`` sums the row first).
    ``lengths`` is ``mask.sum(-1)``; ``dtype`` that of the terms it will multiply."""
    a = advantages if dtype is None else advantages.to(dtype)
    if a.dim() == 1:
        return torch.where(lengths > 0, a, 0.0)[:, None]
    return torch.where(valid, a, 0.0)


def clamp_by_sign(x: "Tensor", adv: "Tensor", *, negative: tuple[float, float], positive: tuple[float, float],
                  zero: tuple[float, float] | None = None) -> "Tensor":
    """``x`` clamped to ``negative`` = (lo, hi) where ``adv`` < 0, to ``positive`` where it is > 0
    and to ``zero`` where it is 0 (none: ``positive`` there too).

    The pessimistic clip of PPO and its relatives is one such clamp:
    max(−A x, −A clip(x, l, u)) = −A · clamp_by_sign(x, A, negative=(l, ∞), positive=(−∞, u)),
    the same value and the same gradient (nothing clipped: ∂/∂x = −A; clipped: 0) as the
    max/min form, for a fraction of the cost of ``torch.maximum``'s backward. The bounds take
    the shape of ``adv``: a (B, 1) column stays a column."""
    neg = adv < 0

    def bound(i: int) -> "Tensor":
        b = torch.where(neg, x.new_tensor(negative[i]), x.new_tensor(positive[i]))
        return b if zero is None else torch.where(adv == 0, x.new_tensor(zero[i]), b)

    return torch.clamp(x, bound(0), bound(1))


class LazyTerms:
    """The per-token terms (B, T) of an aggregated loss, built only when read.

    Training never reads them (``replay --objective`` does), and building them is a pass
    over B × T. Reading any attribute (``terms.detach()``, ``terms.shape``) builds them once,
    without gradient, and answers as that tensor."""

    __slots__ = ("_build", "_value")

    def __init__(self, build: Callable[[], "Tensor"]):
        self._build = build
        self._value = None

    def tensor(self) -> "Tensor":
        if self._value is None:
            with torch.no_grad():
                self._value = self._build()
        return self._value

    def __getattr__(self, name: str):
        return getattr(self.tensor(), name)


def row_sums(loss: "Tensor", mask: "Tensor", *, weight: "Tensor | None" = None, padding: str = "any") -> "Tensor":
    """(B,) Σ_t weight · loss over each row's valid tokens.

    ``padding`` says what ``loss`` holds on padding: "any" (maybe NaN or inf: excluded with
    ``where``), "finite" (excluded by a product with the mask, cheaper) or "zero" (already 0).
    ``weight``: none, a (B, 1) column (one factor per row, applied after the row sum: a
    multiply over B, not B × T) or (B, T) (applied per token). Weights must be finite; a
    (B, T) weight must be 0 on padding (``advantage_weight``), which then also excludes a
    finite loss there."""
    if padding == "any":
        loss = torch.where(mask > 0, loss, 0.0)
    elif padding == "finite":
        if weight is None or weight.shape[-1] == 1:
            loss = loss * mask
    elif padding != "zero":
        raise ValueError(f"unknown padding {padding!r}")
    if weight is None:
        return loss.sum(-1)
    if weight.shape[-1] == 1:
        return weight[:, 0] * loss.sum(-1)
    return (weight * loss).sum(-1)


_SCOPE: "ContextVar[tuple[float, float, float] | None]" = ContextVar("shapeflow_aggregation_scope", default=None)


@contextmanager
def aggregation_scope(tokens: float, rows: float, responses: float):
    """Aggregate over a larger batch than the one in hand: the valid tokens and non-empty rows
    of the whole minibatch (all its micro-batches, on every process). Inside, the means of
    ``aggregate`` divide by these counts, so each micro-batch's loss is its exact share of the
    minibatch's loss and the shares add up to it (the runtime's update loop sets this; verl's
    global-token normalisation, TRL's ``num_items_in_batch``). ``responses`` counts every row,
    empty ones too, for the plain means over responses (``row_mean``)."""
    token = _SCOPE.set((float(tokens), float(rows), float(responses)))
    try:
        yield
    finally:
        _SCOPE.reset(token)


SCOPES = ("micro", "mini", "global")  # rows a loss's statistics may span, narrowest first

_REDUCE_OPS = ("min", "max", "sum")


class ScopeStatistics:
    """Statistics a loss takes over more rows than the micro-batch it is given.

    The update loop runs the update-phase nodes twice for such a scope: first without gradient
    over every micro-batch of the scope (``collecting``), where each ``scope_reduce`` call
    records its micro-batch's value; then the values are combined over the micro-batches (and
    processes), and in the real pass each call gets the scope's value. Calls are matched by
    their position in a micro-batch's run (the graph runs the same stages in the same order on
    every micro-batch) and checked by key."""

    def __init__(self) -> None:
        self.collecting = True
        self.keys: list[str] = []
        self.ops: list[str] = []
        self.values: list["Tensor"] = []
        self._calls = 0

    def start_micro_batch(self) -> None:
        self._calls = 0

    def reduce(self, key: str, value: "Tensor", op: str) -> "Tensor":
        if op not in _REDUCE_OPS:
            raise ValueError(f"unknown scope reduction {op!r} (one of {', '.join(_REDUCE_OPS)})")
        i, self._calls = self._calls, self._calls + 1
        if self.collecting:
            value = value.detach()
            if i == len(self.keys):
                self.keys.append(key)
                self.ops.append(op)
                self.values.append(value.clone())
            else:
                self._check(i, key, op)
                combine = {"min": torch.minimum, "max": torch.maximum, "sum": torch.add}[op]
                self.values[i] = combine(self.values[i], value)
            return value
        if i >= len(self.keys):
            raise RuntimeError(f"scope statistic {key!r} was not collected before the update")
        self._check(i, key, op)
        return self.values[i].to(device=value.device, dtype=value.dtype)

    def _check(self, i: int, key: str, op: str) -> None:
        if (self.keys[i], self.ops[i]) != (key, op):
            raise RuntimeError(f"scope statistics out of order: {key!r} ({op}) where {self.keys[i]!r} "
                               f"({self.ops[i]}) was collected")

    def finish(self, all_reduce: "Callable[[Tensor, str], Tensor] | None" = None) -> None:
        """End the collecting pass; ``all_reduce(value, op)`` combines values over processes."""
        if all_reduce is not None:
            self.values = [all_reduce(v, op) for v, op in zip(self.values, self.ops)]
        self.collecting = False


_STATS: "ContextVar[ScopeStatistics | None]" = ContextVar("shapeflow_scope_statistics", default=None)


@contextmanager
def scope_statistics(stats: ScopeStatistics):
    """Run a micro-batch's update nodes with ``stats`` serving ``scope_reduce``."""
    stats.start_micro_batch()
    token = _STATS.set(stats)
    try:
        yield
    finally:
        _STATS.reset(token)


def scope_reduce(key: str, value: "Tensor", op: str) -> "Tensor":
    """``value`` reduced (min, max or sum) over the rows of the loss's statistics scope.

    A loss computes a statistic of the rows it is given (its micro-batch) and passes it here:
    outside a wider scope (stats_scope = micro, or a direct call) it comes back unchanged;
    when the update loop runs the loss for a minibatch or global scope, it returns the
    statistic over every micro-batch of that scope, under the current weights (STEER's ω_min,
    ω_max). ``value`` must not depend on the gradient path (it is detached)."""
    stats = _STATS.get()
    if stats is None:
        return value
    return stats.reduce(key, value, op)


def row_mean(per_row: "Tensor") -> "Tensor":
    """The mean of a per-response value over the batch's responses (the scope's count inside
    ``aggregation_scope``)."""
    scope = _SCOPE.get()
    return per_row.sum() / scope[2] if scope is not None else per_row.mean()


def reduce_rows(per_row: "Tensor", mask: "Tensor", mode: str, loss_scale_factor: float | None = None, *,
                lengths: "Tensor | None" = None) -> "Tensor":
    """The aggregation of ``aggregate`` from the rows' sums Σ_t ℓm (B,); ``lengths`` = mask.sum(-1).
    Inside ``aggregation_scope`` the token and row counts are the scope's."""
    if lengths is None:
        lengths = mask.sum(-1)
    scope = _SCOPE.get()
    if mode == "token-mean":
        return per_row.sum() / (scope[0] if scope is not None else lengths.sum().clamp(min=1))
    if mode == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(mask.shape[-1])
        return per_row.sum() / norm
    if mode == "seq-mean-token-sum":
        per_seq = per_row
    elif mode == "seq-mean-token-mean":
        per_seq = per_row / (lengths + 1e-8)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    rows = (lengths > 0).to(per_row.dtype)
    return (per_seq * rows).sum() / (scope[1] if scope is not None else rows.sum().clamp(min=1))


def aggregate(loss: "Tensor", mask: "Tensor", mode: str, loss_scale_factor: float | None = None, *,
              weight: "Tensor | None" = None, padding: str = "any", lengths: "Tensor | None" = None,
              sparse: "tuple[Tensor, Tensor] | None" = None, finite: bool = False) -> "Tensor":
    """Reduce a per-token loss ℓ = weight · loss (B, T) to a scalar, as verl's ``agg_loss`` (catalog B11).

    token-mean               Σ ℓm / Σ m
    seq-mean-token-sum       mean over non-empty rows of Σ_t ℓm
    seq-mean-token-mean      mean over non-empty rows of Σ_t ℓm / (|y_i| + 1e-8)
    seq-mean-token-sum-norm  Σ ℓm / loss_scale_factor (default: the padded length T)

    Every mode is a reduction of the rows' sums Σ_t ℓm, so a per-row ``weight`` (B, 1) (a
    sequence advantage) multiplies B row sums, never B × T terms. ``padding`` says what
    ``loss`` holds on padding (see ``row_sums``): by default anything, excluded with
    ``where``, so a NaN there cannot leak in; "finite" (or the older ``finite=True``) lets a
    product with the mask do it; "zero", nothing. An all-padding batch gives 0 rather than
    NaN (the denominators are clamped at 1). ``lengths`` is mask.sum(-1), if the caller has it.
    ``sparse`` = (index, values) adds ``values`` to the terms at a few valid tokens (flat,
    row-major ``index``): each goes into its row's sum, nothing of size B × T is built (a term
    cancelled this way, −t + t, also has exactly no gradient).

    The result carries the per-token terms ℓm as ``.terms`` (built when read; for
    ``replay --objective``, not used by training).
    """
    if finite:
        padding = "finite"
    if lengths is None:
        lengths = mask.sum(-1)
    per_row = row_sums(loss, mask, weight=weight, padding=padding)
    if sparse is not None:
        index, values = sparse
        per_row = per_row.index_add(0, torch.div(index, mask.shape[-1], rounding_mode="floor"), values)
    out = reduce_rows(per_row, mask, mode, loss_scale_factor, lengths=lengths)

    def terms() -> "Tensor":
        lm = torch.where(mask > 0, loss, 0.0) if padding == "any" else loss * mask
        lm = lm if weight is None else weight * lm
        return lm if sparse is None else lm.reshape(-1).index_add(0, *sparse).view_as(lm)

    out.terms = LazyTerms(terms)
    return out


def topk_indices(x: "Tensor", k: int, parts: int = 8) -> "Tensor":
    """The indices of the ``k`` largest entries of a 1-D ``x`` (the set of ``torch.topk(x, k)``;
    ties broken as topk breaks them within each part): the top k of ``parts`` equal chunks,
    then of their union. torch's CPU topk slows down sharply past ~2M entries (45 ms for the
    top 420 of 4M, 5 ms this way)."""
    n = x.numel()
    if n % parts or n // parts < k:
        return x.topk(k).indices
    values, index = x.view(parts, -1).topk(k, dim=-1)
    index = index + torch.arange(parts, device=x.device)[:, None] * (n // parts)
    return index.view(-1)[values.view(-1).topk(k).indices]


def group_min_max(x: "Tensor", index: "Tensor", num_groups: int) -> tuple["Tensor", "Tensor"]:
    """(G,) smallest and largest value of ``x`` (B,) in each group (+inf / −inf for an empty group)."""
    stats = group_stats(x, index, num_groups)
    return stats.lo, stats.hi


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
    x: "Tensor", mask: "Tensor | None", *, eps: float = 1e-8, unbiased: bool = True, eps_at: str = "var",
    padding: str = "any",
) -> "Tensor":
    """``x`` (B,) or (B, T) whitened with the mean and std of its valid entries, 0 elsewhere.

        eps_at = "var":  (x − μ) / sqrt(σ² + eps)     verl ``masked_whiten`` (eps 1e-8)
        eps_at = "std":  (x − μ) / (σ + eps)          TRL (eps 1e-4)

    μ and σ cover every entry where ``mask`` > 0 in the whole tensor (all valid tokens of the
    batch, not one row; ``mask`` none: every entry); σ² is Bessel-corrected (``unbiased``, as
    verl ``masked_var``) or not. Where all valid entries are equal (compared exactly, min ==
    max), and so also with fewer than two of them, the result is exactly 0 (verl raises on a
    single valid token). ``padding`` says what ``x`` holds outside the mask: "any" (maybe NaN
    or inf: excluded with ``where``, so it cannot leak in), "finite" (excluded by a product
    with the 0/1 mask) or "zero".

    verl's ``masked_mean`` divides by Σm + 1e-8; the 1e-8 is left out here (it changes the mean
    by a relative 1e-8/N, below float32 resolution)."""
    if mask is None:
        if x.numel() < 2:  # one value or none: all equal
            return torch.zeros_like(x)
        lo, hi = torch.aminmax(x)
        if eps_at == "std":
            sigma, mean = torch.std_mean(x, correction=int(unbiased))
            out = (x - mean) / (sigma + eps)
        else:
            var, mean = torch.var_mean(x, correction=int(unbiased))
            out = (x - mean) * _whiten_scale(var, eps, eps_at)
        return torch.where(lo >= hi, 0.0, out)
    if padding == "any":
        x = torch.where(mask > 0, x, 0.0)
    elif padding == "finite":
        x = x * mask
    elif padding != "zero":
        raise ValueError(f"unknown padding {padding!r}")
    n = mask.sum()
    mean = x.sum() / n.clamp(min=1)
    d = (x - mean) * mask  # 0 outside the mask
    dof = n - 1 if unbiased else n
    var = torch.dot(d.reshape(-1), d.reshape(-1)) / dof.clamp(min=1)
    # all valid entries equal: with the padding set to one valid value (the first), min == max
    first = x.reshape(-1)[mask.reshape(-1).argmax()]
    lo, hi = torch.aminmax(x + (1 - mask) * first)
    return d * torch.where(lo >= hi, 0.0, _whiten_scale(var, eps, eps_at))


def masked_whiten_rows(
    c: "Tensor", mask: "Tensor", *, eps: float = 1e-8, unbiased: bool = True, eps_at: str = "var",
    lengths: "Tensor | None" = None,
) -> "Tensor":
    """``masked_whiten`` of a value that is constant along each row: c_i on every valid token
    of row i. The same statistics from B numbers weighted by the rows' token counts
    n_i = Σ_t m_{i,t} (``lengths``, if the caller has them), instead of B × T entries:

        μ = Σ n_i c_i / N,  σ² = Σ n_i (c_i − μ)² / (N − 1),  A_{i,t} = (c_i − μ) / sqrt(σ² + eps) · m_{i,t}

    with the same all-equal rule (exactly 0 when every row with tokens has the same c). A row
    without tokens is 0 whatever its c holds."""
    n = mask.sum(-1) if lengths is None else lengths  # (B,)
    if c.numel() == 0:
        return torch.zeros(mask.shape, dtype=c.dtype, device=c.device)
    has = n > 0
    c0 = torch.where(has, c, 0.0)
    total = n.sum()
    mean = (n * c0).sum() / total.clamp(min=1)
    d = torch.where(has, c0 - mean, 0.0)
    dof = total - 1 if unbiased else total
    var = (n * d * d).sum() / dof.clamp(min=1)
    flat = torch.where(has, c0, float("inf")).amin() >= torch.where(has, c0, -float("inf")).amax()
    row = torch.where(flat, 0.0, d * _whiten_scale(var, eps, eps_at))  # (B,)
    return row[:, None] * mask.to(row.dtype)


def no_holes(mask: "Tensor", lengths: "Tensor | None" = None) -> bool:
    """Every row's valid tokens form one prefix (nothing masked before its last valid token).
    ``lengths`` is mask.sum(-1), if the caller has it."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
    return bool(((mask * positions).amax(-1) == (mask.sum(-1) if lengths is None else lengths)).all())


def place_at_last_token(x: "Tensor", mask: "Tensor") -> "Tensor":
    """A sequence value (B,) as a token value (B, T): x_i at row i's last valid token, 0
    elsewhere (verl writes the score at ``valid_response_length − 1``). A token value (B, T)
    is returned with its padding zeroed. Rows without valid tokens get nothing."""
    if x.dim() == 2:
        return torch.where(mask > 0, x, 0.0)
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).amax(-1).long() - 1  # (B,), −1 for an empty row
    has = last >= 0
    out = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
    return out.scatter_(1, last.clamp(min=0)[:, None], torch.where(has, x, 0.0)[:, None])


def discounted_returns(rewards: "Tensor", mask: "Tensor", gamma: float, *, prefix: bool | None = None) -> "Tensor":
    """(B, T) reward-to-go G_t = r_t + γ·m_{t+1}·G_{t+1}, as verl's REINFORCE++ loop.

    ``rewards`` must be 0 outside ``mask`` (``place_at_last_token`` gives that). The running
    return is reset to 0 after every position outside ``mask`` (padding, or a masked tool
    span), so nothing flows back across it; positions outside ``mask`` hold whatever the
    recursion gives there, and a caller masks them. ``prefix``: every row's valid tokens are
    one prefix (``no_holes``; found here if not given).

    γ = 1 needs no pass over T: the reverse cumulative sum C_t = Σ_{s ≥ t} r_s, minus C at the
    first position after t outside the mask (0 with prefix masks, whose padding is 0). γ < 1:
    one pass over T with (B,) operations, vectorised over the batch, on a contiguous (T, B)
    copy (each step reads and writes one contiguous row)."""
    B, T = rewards.shape
    if gamma == 1.0:
        c = rewards.flip(-1).cumsum(-1).flip(-1)
        if prefix if prefix is not None else no_holes(mask):
            return c
        pos = torch.arange(T, device=mask.device)
        nxt = torch.where(mask > 0, T, pos).flip(-1).cummin(-1).values.flip(-1)  # first position ≥ t outside
        nxt = torch.cat((nxt[:, 1:], nxt.new_full((B, 1), T)), 1)  # ... > t (T: none)
        return c - torch.cat((c, c.new_zeros(B, 1)), 1).gather(1, nxt)
    r = rewards.t().contiguous()  # (T, B)
    m = mask.to(rewards.dtype).t().contiguous()
    out = torch.empty_like(r)
    carry = rewards.new_zeros(B)  # m_{t+1} G_{t+1}
    for t in range(T - 1, -1, -1):
        torch.add(r[t], carry, alpha=gamma, out=out[t])
        torch.mul(out[t], m[t], out=carry)
    return out.t().contiguous()
