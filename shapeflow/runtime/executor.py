"""Execute planned nodes: stages through the registry, operators by one generic rule.

No stage names appear here. A stage is called as ``fn(*inputs, **params)`` exactly as its
declaration promises; an operator combines its operands with broadcasting of sequence-level
values over tokens. Values follow the type shapes: Signal/Advantage[seq] are (B,),
[tok] are (B, T) and zero on padding, Loss is a scalar tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from shapeflow._lazy import torch
from shapeflow.compiler.check import Node, Program
from shapeflow.stdlib.registry import Registry
from shapeflow.stdlib.state import StageState

if TYPE_CHECKING:
    from torch import Tensor


class StageError(RuntimeError):
    """A stage failed while running; the message names the stage and its spec line."""

    def __init__(self, node: Node, exc: BaseException):
        where = f"{node.span.file}:{node.span.line}:{node.span.column}"
        what = f"'{node.stage}'" + (f" (binding '{node.binding}')" if node.binding else "")
        super().__init__(f"{where}: {what} failed: {exc}")
        self.node, self.cause = node, exc


def _broadcast(a: "Tensor", b: "Tensor") -> tuple["Tensor", "Tensor"]:
    """A (B,) operand meets a (B, T) one: the sequence value applies to every token."""
    if a.dim() == 1 and b.dim() == 2:
        return a[:, None], b
    if a.dim() == 2 and b.dim() == 1:
        return a, b[:, None]
    return a, b


_BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


def apply_op(node: Node, args: list[Any], mask: "Tensor | None") -> Any:
    if node.op == "alias":
        return args[0]
    if node.op == "neg":
        return -args[0]
    operands = dict(zip((side for side, _ in node.inputs), args))
    operands.update(node.params)  # constant operands by side
    left, right = operands["left"], operands["right"]
    if torch.is_tensor(left) and torch.is_tensor(right):
        left, right = _broadcast(left, right)
    out = _BINARY[node.op](left, right)
    if node.type.level == "tok" and mask is not None and torch.is_tensor(out) and out.dim() == 2:
        out = out * mask  # a constant shift must not reach the padding
    return out


def run_nodes(
    program: Program,
    order: Iterable[str],
    values: dict[str, Any],
    registry: Registry,
    mask: "Tensor | None" = None,
    ctx: Any = None,
    check: "Callable[[Node, Any], Any] | None" = None,
    states: "dict[str, StageState] | None" = None,
) -> dict[str, Any]:
    """Compute ``order``'s nodes into ``values`` (which holds their inputs already).

    Stages declared with ``context=True`` also get ``ctx`` (the runtime's step context);
    stateful stages get ``state``: their entry of ``states`` (created there, fresh, when
    missing; without ``states``, a throwaway fresh state). ``check(node, value)``, when given,
    sees (and may replace) every stage's output."""
    for node_id in order:
        node = program.nodes[node_id]
        args = [values[src] for _, src in node.inputs]
        if node.op == "stage":
            st = registry[node.stage]
            extra = {}
            if st.context:
                if ctx is not None and hasattr(ctx, "node_id"):
                    ctx.node_id = node_id
                extra["ctx"] = ctx
            if st.stateful:
                state = states.get(node_id) if states is not None else None
                if state is None:
                    state = new_state(program, node_id, registry)
                    if states is not None:
                        states[node_id] = state
                extra["state"] = state
            try:
                values[node_id] = st.fn(*args, **node.params, **extra)
            except Exception as exc:  # reported with the spec line; the caller decides to stop
                raise StageError(node, exc) from exc
            if check is not None:
                values[node_id] = check(node, values[node_id])
        else:
            values[node_id] = apply_op(node, args, mask)
    return values


def new_state(program: Program, node_id: str, registry: Registry, step: int = 0) -> StageState:
    """A fresh state for a stateful node (its declared keys, the run's length from train.steps)."""
    node = program.nodes[node_id]
    train = program.config.get("train") if isinstance(program.config, dict) else None
    total = int(getattr(train, "steps", 1) or 1)
    return StageState(dict(registry[node.stage].state), step=step, total_steps=total,
                      owner=f"'{node.stage}' (binding '{node.binding or node_id}')")


def new_states(program: Program, registry: Registry, order: Iterable[str]) -> dict[str, StageState]:
    """Fresh states for the stateful nodes among ``order``."""
    return {n: new_state(program, n, registry) for n in order
            if program.nodes[n].op == "stage" and registry[program.nodes[n].stage].stateful}


def downstream_of(program: Program, sources: Iterable[str], order: Iterable[str]) -> list[str]:
    """The nodes of ``order`` that depend (transitively) on any of ``sources``, in order."""
    reached = set(sources)
    out = []
    for node_id in order:
        if any(src in reached for _, src in program.nodes[node_id].inputs):
            reached.add(node_id)
            out.append(node_id)
    return out
