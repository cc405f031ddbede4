"""State that a stage keeps across training steps: trackers, EMAs, adaptive coefficients.

A stage declares what it keeps, with one line of documentation per key::

    @stage("rewards.kl_penalty", ..., state={"coef": "the KL coefficient in use (adaptive mode)"})
    def kl_penalty(..., *, target, horizon, state): ...

and gets keyword ``state``, a :class:`StageState`: a small mapping that the stage reads and
updates in place (``state.setdefault("coef", init)``), plus the step being computed
(``state.step``, 0-based) and the run's length (``state.total_steps``), which schedules use.

The runtime owns one StageState per stateful node of the graph: it sets ``step`` before each
training step, saves ``state_dict()`` in every checkpoint and restores it on ``--resume``,
logs ``metrics()`` as ``state/<binding>/<key>`` every step, and gives the nodes that it runs a
second time on other batches (the greedy baseline, evaluation) a copy, so that only the
training batch advances the state. ``replay`` carries the state from one recorded step to the
next, starting from a fresh state or from a checkpoint (``replay --state``).

What a state may hold: numbers, strings, booleans, None, tensors, and lists/dicts of them
(everything ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Mapping


class StageState:
    """One stateful node's state: a mapping of the declared keys, the current step, the run length."""

    __slots__ = ("data", "declared", "step", "total_steps", "owner")

    def __init__(self, declared: Mapping[str, str] | None = None, *, step: int = 0, total_steps: int = 1,
                 owner: str = "stage"):
        self.data: dict[str, Any] = {}
        self.declared = dict(declared or {})
        self.step = step
        self.total_steps = total_steps
        self.owner = owner

    # --- the mapping a stage reads and writes ----------------------------------------------
    def _key(self, key: str) -> str:
        if self.declared and key not in self.declared:
            raise KeyError(f"{self.owner} keeps no state '{key}' (declared: {', '.join(self.declared)})")
        return key

    def __getitem__(self, key: str) -> Any:
        return self.data[self._key(key)]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[self._key(key)] = value

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(self._key(key), default)

    def setdefault(self, key: str, default: Any) -> Any:
        return self.data.setdefault(self._key(key), default)

    def __repr__(self) -> str:
        return f"StageState(step={self.step}, {self.data!r})"

    # --- what the runtime does with it -------------------------------------------------------
    def copy(self) -> "StageState":
        """An independent copy (tensors cloned): a second evaluation must not advance the state."""
        other = StageState(self.declared, step=self.step, total_steps=self.total_steps, owner=self.owner)
        other.data = copy.deepcopy(self.data)
        return other

    def state_dict(self) -> dict[str, Any]:
        return {"data": copy.deepcopy(self.data)}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        data = dict(saved.get("data", {}))
        unknown = sorted(set(data) - set(self.declared)) if self.declared else []
        if unknown:
            raise ValueError(f"{self.owner}: the saved state holds keys it does not declare: {', '.join(unknown)}")
        self.data = copy.deepcopy(data)

    def metrics(self) -> dict[str, float]:
        """Scalars as they are; a tensor or list of numbers as its mean and size (a per-prompt tracker)."""
        out: dict[str, float] = {}
        for key, value in self.data.items():
            scalar = _scalar(value)
            if scalar is not None:
                out[key] = scalar
                continue
            numbers = _numbers(value)
            if numbers:
                finite = [x for x in numbers if math.isfinite(x)]
                if finite:
                    out[f"{key}/mean"] = sum(finite) / len(finite)
                out[f"{key}/size"] = float(len(numbers))
        return out


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "dim") and value.dim() == 0 and not value.dtype.is_complex:
        return float(value.detach().item())
    return None


def _numbers(value: Any) -> list[float]:
    if hasattr(value, "numel"):
        return [float(x) for x in value.detach().flatten().tolist()] if value.numel() else []
    if isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return [float(x) for x in value]
    if isinstance(value, dict) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value.values()):
        return [float(x) for x in value.values()]
    return []
