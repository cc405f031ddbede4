"""The value of type ``Rollouts``: one step's responses as padded tensors plus their needs.

B responses, padded to T tokens. Responses with the same prompt form a group; groups are
given by ``group_index`` (B,) with values in ``0..num_groups-1``, so group statistics are a
scatter over it, never a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from shapeflow._lazy import torch
from shapeflow.stdlib.needs import MissingNeed, need_info

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class RolloutBatch:
    prompt_ids: list[Any]  # (B,) the prompt each response answers
    group_index: "Tensor"  # (B,) long, group of each response
    mask: "Tensor"  # (B, T) float, 1 on response tokens
    prompts: list[str] | None = None
    answers: list[str] | None = None
    responses: list[str] | None = None
    response_ids: "Tensor | None" = None  # (B, T) long
    logprobs: "Tensor | None" = None  # (B, T) behaviour log-probs
    ref_logprobs: "Tensor | None" = None  # (B, T)
    entropy: "Tensor | None" = None  # (B, T)
    truncated: "Tensor | None" = None  # (B,) bool
    scores: dict[str, "Tensor"] = field(default_factory=dict)  # name -> (B,)
    extra: dict[str, Any] = field(default_factory=dict)  # other needs by name
    examples: list[Any] | None = None  # (B,) the task example each response answers
    task: Any = None  # the TaskData the prompts came from (its scorer, its name)
    # Runtime-only tensors (not needs): the prompt tokens the responses continue.
    prompt_tokens: "Tensor | None" = None  # (B, P) left-padded
    prompt_mask: "Tensor | None" = None  # (B, P)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def device(self):
        """Where the batch's tensors live; stages create their outputs there."""
        return self.mask.device

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max().item()) + 1 if self.size else 0

    @property
    def lengths(self) -> "Tensor":
        """(B,) number of response tokens."""
        return self.mask.sum(-1)

    def need(self, name: str) -> Any:
        """The recorded value of need ``name``, or a MissingNeed naming the field."""
        info = need_info(name)
        where = info.field if info is not None else f"extra.{name}"
        value = self.extra.get(where.removeprefix("extra.")) if where.startswith("extra.") else {
            "prompt": self.prompts,
            "answer": self.answers,
            "response": self.responses,
            "response_ids": self.response_ids,
            "logprobs": self.logprobs,
            "ref_logprobs": self.ref_logprobs,
            "entropy": self.entropy,
            "truncated": self.truncated,
            "scores": self.scores or None,
        }.get(name)
        if value is None:
            raise MissingNeed(f"the rollouts carry no '{where}' (need '{name}')")
        return value

    def to(self, device) -> "RolloutBatch":
        """The same batch with every tensor on ``device`` (a new object; lists are shared)."""

        def move(v):
            return v.to(device) if hasattr(v, "to") and hasattr(v, "device") else v

        changes = {f: move(getattr(self, f)) for f in ("group_index", "mask", "response_ids", "logprobs",
                                                       "ref_logprobs", "entropy", "truncated", "prompt_tokens",
                                                       "prompt_mask")}
        return replace(self, **changes, scores={k: move(v) for k, v in self.scores.items()},
                       extra={k: move(v) for k, v in self.extra.items()})

    def select(self, rows: "Tensor") -> "RolloutBatch":
        """The sub-batch of ``rows`` (a minibatch); group ids are kept."""
        idx = rows.tolist()

        def pick(v):
            if v is None:
                return None
            if isinstance(v, list):
                return [v[i] for i in idx]
            if hasattr(v, "index_select"):
                return v.index_select(0, rows)
            return v

        return RolloutBatch(
            prompt_ids=pick(self.prompt_ids),
            group_index=pick(self.group_index),
            mask=pick(self.mask),
            prompts=pick(self.prompts),
            answers=pick(self.answers),
            responses=pick(self.responses),
            response_ids=pick(self.response_ids),
            logprobs=pick(self.logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            entropy=pick(self.entropy),
            truncated=pick(self.truncated),
            scores={k: pick(v) for k, v in self.scores.items()},
            extra={k: pick(v) for k, v in self.extra.items()},
            examples=pick(self.examples),
            task=self.task,
            prompt_tokens=pick(self.prompt_tokens),
            prompt_mask=pick(self.prompt_mask),
        )


def pad_responses(batch: RolloutBatch, width: int, pad_id: int) -> RolloutBatch:
    """``batch`` with its response tensors right-padded to ``width`` tokens (padding: mask 0,
    token ``pad_id``, 0 elsewhere), as trainers that pad every response to the length limit
    lay out a batch (verl's max_response_length). Fields already wider stay as they are."""
    T = batch.mask.shape[1]
    if width <= T:
        return batch

    def right(x, value=0):
        if x is None or not hasattr(x, "dim") or x.dim() < 2 or x.shape[1] != T:
            return x
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - T), value=value)

    return replace(
        batch, mask=right(batch.mask), response_ids=right(batch.response_ids, pad_id), logprobs=right(batch.logprobs),
        ref_logprobs=right(batch.ref_logprobs), entropy=right(batch.entropy),
        extra={k: right(v) for k, v in batch.extra.items()},
    )


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Batches of different steps' rounds as one: rows in order, response tensors right-padded
    (and prompt tensors left-padded) to the widest, groups renumbered 0..G−1 so that groups of
    different batches stay apart even when they answer the same prompt."""
    T = max(b.mask.shape[1] for b in batches)
    P = max(b.prompt_tokens.shape[1] for b in batches) if all(b.prompt_tokens is not None for b in batches) else 0

    def right(x, width):
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1])) if x.dim() >= 2 else x

    def join(values, *, left: bool = False):
        if any(v is None for v in values):
            return None
        if isinstance(values[0], list):
            return [x for v in values for x in v]
        if left:
            return torch.cat([torch.nn.functional.pad(v, (P - v.shape[1], 0)) for v in values])
        return torch.cat([right(v, T) for v in values])

    offsets, groups = 0, []
    for b in batches:
        groups.append(b.group_index + offsets)
        offsets += int(b.group_index.max()) + 1 if b.size else 0
    _, group_index = torch.unique(torch.cat(groups), return_inverse=True)
    common_scores = set.intersection(*(set(b.scores) for b in batches))
    common_extra = set.intersection(*(set(b.extra) for b in batches))
    return RolloutBatch(
        prompt_ids=join([b.prompt_ids for b in batches]),
        group_index=group_index,
        mask=join([b.mask for b in batches]),
        prompts=join([b.prompts for b in batches]),
        answers=join([b.answers for b in batches]),
        responses=join([b.responses for b in batches]),
        response_ids=join([b.response_ids for b in batches]),
        logprobs=join([b.logprobs for b in batches]),
        ref_logprobs=join([b.ref_logprobs for b in batches]),
        entropy=join([b.entropy for b in batches]),
        truncated=join([b.truncated for b in batches]),
        scores={k: join([b.scores[k] for b in batches]) for k in sorted(common_scores)},
        extra={k: join([b.extra[k] for b in batches]) for k in sorted(common_extra)},
        examples=join([b.examples for b in batches]),
        task=batches[0].task,
        prompt_tokens=join([b.prompt_tokens for b in batches], left=True),
        prompt_mask=join([b.prompt_mask for b in batches], left=True),
    )


def group_index_of(prompt_ids: list[Any]) -> "Tensor":
    """(B,) group index of each response: prompt ids numbered in order of first appearance."""
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(p, len(seen)) for p in prompt_ids], dtype=torch.long)
