"""`shapeflow replay`: evaluate a spec's verify → reward → advantage nodes on recorded rollouts.

Input: JSON Lines, one response per line (DESIGN.md §4); lines with the same ``prompt_id``
form a group. Output: one JSON line per input line, in the same order::

    {"prompt_id": ..., "advantages": [per-token floats], "signals": {binding: value or list}}

The rollout node of the spec is replaced by the recorded batch; the rollout-phase nodes
downstream of it run exactly as in training. Nothing here needs a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from shapeflow._lazy import torch
from shapeflow.compiler.check import Program
from shapeflow.runtime.batch import MissingNeed, RolloutBatch, group_index_of
from shapeflow.runtime.executor import StageError, downstream_of, new_states, run_nodes
from shapeflow.stdlib.needs import need_info
from shapeflow.stdlib.registry import Registry, default_registry

PER_TOKEN = ("logprobs", "ref_logprobs", "entropy", "response_ids")
TEXT = ("prompt", "answer", "response")


class ReplayError(Exception):
    """Bad input or a failing stage: the message names the line or the spec location."""


def _fail(lineno: int, message: str) -> ReplayError:
    return ReplayError(f"line {lineno}: {message}")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse and validate the JSONL file; every error names its line."""
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    with handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _fail(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(rec, dict):
                    raise _fail(lineno, "each line must be a JSON object")
                _validate(rec, lineno)
                rec["_line"] = lineno
                records.append(rec)
        except UnicodeDecodeError as exc:
            raise ReplayError(f"{path} is not valid UTF-8 ({exc.reason})") from None
    if not records:
        raise ReplayError(f"{path} holds no rollouts")
    return records


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(rec: dict[str, Any], lineno: int) -> None:
    if "prompt_id" not in rec:
        raise _fail(lineno, "missing 'prompt_id'")
    if not isinstance(rec["prompt_id"], (str, int)) or isinstance(rec["prompt_id"], bool):
        raise _fail(lineno, "'prompt_id' must be a string or an integer")
    for key in TEXT:
        if key in rec and not isinstance(rec[key], str):
            raise _fail(lineno, f"'{key}' must be a string")
    lengths = {}
    for key in PER_TOKEN:
        if key in rec:
            value = rec[key]
            if not isinstance(value, list) or not all(_is_number(v) for v in value):
                raise _fail(lineno, f"'{key}' must be a list of numbers")
            lengths[key] = len(value)
    if "step" in rec and (not isinstance(rec["step"], int) or isinstance(rec["step"], bool)):
        raise _fail(lineno, "'step' must be an integer")
    extra = rec.get("extra", {})
    if not isinstance(extra, dict):
        raise _fail(lineno, "'extra' must be an object")
    for key, value in extra.items():
        need = need_info(key)
        if need is not None and need.level == "tok":
            if not isinstance(value, list) or not all(_is_number(v) for v in value):
                raise _fail(lineno, f"'extra.{key}' must be a list of numbers (one per token)")
            lengths[f"extra.{key}"] = len(value)
    if "length" in rec:
        if not isinstance(rec["length"], int) or isinstance(rec["length"], bool) or rec["length"] < 0:
            raise _fail(lineno, "'length' must be a non-negative integer")
        lengths["length"] = rec["length"]
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise _fail(lineno, f"per-token lists of unequal length: {detail}")
    if "truncated" in rec and not isinstance(rec["truncated"], bool):
        raise _fail(lineno, "'truncated' must be true or false")
    scores = rec.get("scores", {})
    if not isinstance(scores, dict) or not all(_is_number(v) for v in scores.values()):
        raise _fail(lineno, "'scores' must be an object of numbers")
    for key, value in list(scores.items()) + [(k, v) for k in PER_TOKEN if k in rec for v in rec[k]]:
        if _is_number(value) and not math.isfinite(value):
            raise _fail(lineno, f"'{key}' holds a non-finite number")
    rec["_tokens"] = next(iter(lengths.values()), None)


def _token_count(rec: dict[str, Any]) -> int:
    if rec["_tokens"] is None:
        raise _fail(rec["_line"], "no token count: give 'length', 'response_ids' or a per-token list such as 'logprobs'")
    return rec["_tokens"]


def _padded(rows: list[list[float]], width: int, dtype) -> "torch.Tensor":
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def build_batch(records: list[dict[str, Any]], needs: set[str]) -> RolloutBatch:
    """Recorded lines → a RolloutBatch, checking that every need is present on every line."""
    for need in sorted(needs):
        info = need_info(need)
        field = info.field
        for rec in records:
            present = rec.get("extra", {}).get(field[6:]) if field.startswith("extra.") else rec.get(field)
            if present is None:
                raise _fail(rec["_line"], f"the spec needs '{field}' ({info.doc}), which this line lacks")
    lengths = [_token_count(r) for r in records]
    width = max(lengths, default=0)
    mask = torch.zeros(len(records), width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    prompt_ids = [r["prompt_id"] for r in records]

    def per_token(key: str, dtype=torch.float32):
        if not all(key in r for r in records):
            return None
        return _padded([r[key] for r in records], width, dtype)

    score_keys = sorted(set().union(*(r.get("scores", {}).keys() for r in records)))
    for key in score_keys:
        lacking = next((r["_line"] for r in records if key not in r.get("scores", {})), None)
        if lacking is not None and "scores" in needs:
            raise _fail(lacking, f"no score '{key}', which other lines record")
    scores = {
        k: torch.tensor([float(r["scores"][k]) for r in records])
        for k in score_keys
        if all(k in r.get("scores", {}) for r in records)
    }
    extra: dict[str, Any] = {}
    for key in set().union(*(r.get("extra", {}).keys() for r in records)):
        values = [r.get("extra", {}).get(key) for r in records]
        need = need_info(key)
        if need is not None and need.level == "tok" and all(v is not None for v in values):
            extra[key] = _padded(values, width, torch.float32)
        else:
            extra[key] = values
    texts = {k: [r[k] for r in records] if all(k in r for r in records) else None for k in TEXT}
    return RolloutBatch(
        prompt_ids=prompt_ids,
        group_index=group_index_of(prompt_ids),
        mask=mask,
        prompts=texts["prompt"],
        answers=texts["answer"],
        responses=texts["response"],
        response_ids=per_token("response_ids", torch.long),
        logprobs=per_token("logprobs"),
        ref_logprobs=per_token("ref_logprobs"),
        entropy=per_token("entropy"),
        truncated=torch.tensor([bool(r.get("truncated", False)) for r in records]),
        scores=scores,
        extra=extra,
    )


def _choose_advantage(program: Program, nodes: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in program.bindings or program.nodes[program.bindings[wanted]].type.base != "Advantage":
            names = [b for b, n in program.bindings.items() if program.nodes[n].type.base == "Advantage"]
            raise ReplayError(f"--advantage {wanted}: not an advantage binding (advantage bindings: "
                              f"{', '.join(names) or 'none'})")
        return program.bindings[wanted]
    in_rollout = set(nodes)
    feeding = []
    for node in program.nodes.values():
        if node.phase == "update":
            for _, src in node.inputs:
                if src in in_rollout and program.nodes[src].type.base == "Advantage" and src not in feeding:
                    feeding.append(src)
    if len(feeding) != 1:
        names = ", ".join(program.nodes[n].binding or n for n in feeding) or "none"
        raise ReplayError(f"cannot tell which advantage to report (advantages feeding the objective: {names}); "
                          "choose one with --advantage BINDING")
    return feeding[0]


def _row(value: "torch.Tensor", i: int, n_tokens: int) -> float | list[float]:
    if value.dim() == 0:
        return float(value)
    if value.dim() == 1:
        return float(value[i])
    return [float(v) for v in value[i, :n_tokens]]


def replay(
    program: Program,
    rollouts: Path,
    out: IO[str],
    *,
    advantage: str | None = None,
    registry: Registry | None = None,
    objective: bool = False,
    report: IO[str] | None = None,
    state: Path | None = None,
) -> None:
    """Evaluate the rollout-phase nodes on each recorded step's lines (one batch per `step`
    value; a file without `step` fields is one batch) and write one line per input line.

    With ``objective``, the update-phase nodes run too, on the recorded current-policy
    log-probs (``extra.policy_logprobs``): each line gains the per-token terms of every loss
    stage and the gradient of the aggregated objective with respect to each of its
    ``policy_logprobs``; the aggregated objective of each batch goes to ``report``.

    Stateful stages (trackers, EMAs, adaptive coefficients) carry their state from one step to
    the next, in step order, starting fresh or from the checkpoint ``state`` (a checkpoint
    folder or a run folder: its newest checkpoint)."""
    registry = registry or default_registry()
    records = read_records(rollouts)
    from shapeflow.compiler.pipeline import build_plan

    _, plan = build_plan(program)
    rollout_nodes = [n for n in plan.phases["rollout"] if n in program.engines]  # the generating stages
    nodes = downstream_of(program, rollout_nodes, plan.phases["rollout"])
    update = list(plan.phases["update"]) if objective else []
    needs = set().union(*(program.nodes[n].needs for n in nodes + update)) if nodes else set()
    adv_node = _choose_advantage(program, nodes, advantage)
    steps: dict[Any, list[dict[str, Any]]] = {}
    for rec in records:
        steps.setdefault(rec.get("step"), []).append(rec)
    states = _initial_states(program, registry, nodes + update, state)
    results: dict[int, str] = {}
    for step, group in sorted(steps.items(), key=lambda kv: (kv[0] is not None, kv[0] if kv[0] is not None else 0)):
        for st in states.values():
            st.step = step if step is not None else 0
        lines = _evaluate(program, group, needs, nodes, rollout_nodes, adv_node, registry, update, plan.objective,
                          states)
        for rec, (line, loss) in zip(group, lines):
            results[rec["_line"]] = json.dumps(line)
        if update and report is not None:
            where = f"step {step}" if step is not None else "all lines"
            report.write(f"objective ({where}, {len(group)} responses): {loss:.10g}\n")
    for rec in records:
        out.write(results[rec["_line"]] + "\n")


def _initial_states(program, registry, nodes, checkpoint: Path | None) -> dict:
    states = new_states(program, registry, nodes)
    if checkpoint is None:
        return states
    from shapeflow.runtime.run import find_checkpoint, load_checkpoint
    from shapeflow.runtime.trainer import RunError

    try:
        path = find_checkpoint(checkpoint)
        saved = load_checkpoint(path).get("stage_state", {})
    except (RunError, OSError, RuntimeError) as exc:
        raise ReplayError(f"--state: {exc}") from None
    missing = sorted(set(states) - set(saved))
    if missing:
        raise ReplayError(f"--state: {path} holds no state for {', '.join(missing)} (a checkpoint of another spec?)")
    for node_id, st in states.items():
        try:
            st.load_state_dict(saved[node_id])
        except ValueError as exc:
            raise ReplayError(f"--state: {exc}") from None
    return states


def _evaluate(program, records, needs, nodes, rollout_nodes, adv_node, registry, update=(), objective=None,
              states=None):
    batch = build_batch(records, needs)
    values: dict[str, Any] = {n: batch for n in rollout_nodes}
    policy = None
    if update:  # the recorded current-policy log-probs become the leaf the gradient is taken for
        policy = batch.extra["policy_logprobs"].clone().requires_grad_(True)
        batch.extra["policy_logprobs"] = policy
    try:
        run_nodes(program, nodes, values, registry, batch.mask, states=states)
        if update:
            for v in list(values.values()):  # batches derived in the rollout phase see the same leaf
                if isinstance(v, RolloutBatch):
                    v.extra["policy_logprobs"] = policy
            run_nodes(program, update, values, registry, batch.mask, states=states)
    except StageError as exc:
        cause = exc.cause
        detail = str(cause) if isinstance(cause, MissingNeed) else f"{type(cause).__name__}: {cause}"
        raise ReplayError(f"{exc.node.span.file}:{exc.node.span.line}: '{exc.node.stage}' failed on the "
                          f"recorded rollouts: {detail}") from None
    loss = None
    grad = None
    if update:
        total = values[objective]
        (grad,) = torch.autograd.grad(total, policy, allow_unused=True)
        grad = torch.zeros_like(policy) if grad is None else grad
        loss = float(total.detach())
    shown = [
        (name, node_id)
        for name, node_id in program.bindings.items()
        if node_id in values and program.nodes[node_id].type.base in ("Signal", "Advantage")
    ]
    terms = {n: values[n].terms for n in update if getattr(values[n], "terms", None) is not None}
    lengths = batch.mask.sum(-1).long().tolist()
    adv = values[adv_node]
    lines = []
    for i, rec in enumerate(records):
        n = lengths[i]
        a = _row(adv, i, n)
        line = {
            "prompt_id": rec["prompt_id"],
            "advantages": [a] * n if isinstance(a, float) else a,
            "signals": {name: _row(values[node_id], i, n) for name, node_id in shown},
        }
        if update:
            line["loss_terms"] = {program.nodes[k].binding or k: _row(t.detach(), i, n) for k, t in terms.items()}
            line["grad_policy_logprobs"] = _row(grad, i, n)
        lines.append((line, loss))
    return lines


def batch_records(batch: RolloutBatch, step: int) -> list[dict[str, Any]]:
    """One step's batch in the recorded-rollout format, every need the run computed included."""
    lengths = batch.mask.sum(-1).long().tolist()
    out = []
    for i, n in enumerate(lengths):
        rec: dict[str, Any] = {"prompt_id": batch.prompt_ids[i], "step": step}
        for key, texts in (("prompt", batch.prompts), ("answer", batch.answers), ("response", batch.responses)):
            if texts is not None:
                rec[key] = texts[i]
        if batch.response_ids is not None:
            rec["response_ids"] = batch.response_ids[i, :n].tolist()
        for key in ("logprobs", "ref_logprobs", "entropy"):
            value = getattr(batch, key)
            if value is not None:
                rec[key] = value[i, :n].tolist()
        rec["length"] = n
        if batch.truncated is not None:
            rec["truncated"] = bool(batch.truncated[i])
        if batch.scores:
            rec["scores"] = {k: float(v[i]) for k, v in batch.scores.items()}
        extra = {}
        for key, value in batch.extra.items():
            if key == "policy_logprobs":
                continue
            if hasattr(value, "dim"):
                extra[key] = value[i, :n].tolist() if value.dim() >= 2 else float(value[i])
        if extra:
            rec["extra"] = extra
        out.append(rec)
    return out
