"""Check: names, types, parameters, phases and needs of a resolved spec → a Program.

The checker walks each binding's expression once, creating one node per stage call and per
operator, with the stage's parameters validated by its pydantic model. Every problem becomes
a diagnostic; an expression with an error yields ``None`` so that one mistake is reported
once, not again by every binding that uses it. A Program without errors lowers to a graph
mechanically (``lower.py``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from shapeflow._record import Record, record
from shapeflow.compiler import types as T
from shapeflow.compiler.resolve import COMMAND_LINE, Resolved
from shapeflow.config import CONFIG_BLOCKS
from shapeflow.dsl import ast
from shapeflow.dsl.diagnostics import Diagnostics, Span
from shapeflow.stdlib.needs import need_info, provided_by_trainer, resolve_needs
from shapeflow.stdlib.params import bounds, quick_instance, quick_validate, type_words
from shapeflow.stdlib.registry import Registry, Stage

OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


@record
class Node(Record):
    """One stage instance or operator. ``inputs`` maps argument names to producing node ids;
    ``params`` holds validated stage parameters, or an operator's constant operands."""

    id: str
    op: str  # "stage", "add", "sub", "mul", "div", "neg", "alias"
    stage: str | None
    params: dict[str, Any]
    inputs: tuple[tuple[str, str], ...]
    type: T.Type
    phase: str
    needs: frozenset[str]
    binding: str | None  # set on the node that is a binding's value
    kind: str | None  # the binding's kind, on that node
    span: Span
    order: int  # creation order, for stable topological sorting

    @property
    def label(self) -> str:
        return self.stage if self.op == "stage" else {"add": "+", "sub": "−", "mul": "×", "div": "÷", "neg": "−", "alias": "="}[self.op]


@dataclass
class Program:
    """A checked spec: everything the lowering and the runtime need, as plain data."""

    name: str
    file: str
    header: dict[str, Any]
    params: dict[str, Any]
    nodes: dict[str, Node] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)  # binding name -> node id
    config: dict[str, BaseModel] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    engines: dict[str, str] = field(default_factory=dict)  # rollout node id -> engine name
    chain: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str | None:
        return next((self.bindings[n] for n, i in self.bindings.items() if self.nodes[i].kind == "objective"), None)


@record
class _Const(Record):
    value: Any
    type: T.Type


@record
class _Ref(Record):
    node: str
    type: T.Type


_Value = _Const | _Ref | None


def _const_type(value: Any) -> T.Type:
    if value is None:
        return T.Type("None")
    if isinstance(value, bool):
        return T.Type("Bool")
    if isinstance(value, (int, float)):
        return T.Type("Number")
    if isinstance(value, str):
        return T.Type("String")
    return T.Type("List")


def _suggest(name: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class Checker:
    def __init__(self, resolved: Resolved, registry: Registry, diags: Diagnostics):
        self.r, self.reg, self.diags = resolved, registry, diags
        self.nodes: dict[str, Node] = {}
        self.param_values: dict[str, _Const | None] = {}
        self.binding_values: dict[str, _Value] = {}
        self.in_progress: list[str] = []
        self.used_names: set[str] = set(resolved.mentioned)
        self.counter: dict[str, int] = {}
        self.cyclic: set[str] = set()
        self.suggested: set[str] = set()

    # --- entry point
    def run(self) -> Program:
        order = self._dependency_order()  # dependencies first: no deep recursion on long chains
        for name in order:
            if name in self.r.params:
                self._param(name)
        for name in order:
            if name in self.r.bindings:
                self._binding(name)
        prog = Program(
            name=self.r.name,
            file=self.r.file,
            header={k: e.value.value for k, e in self.r.header.items() if isinstance(e.value, ast.String)},
            params={k: v.value for k, v in self.param_values.items() if v is not None},
            nodes=self.nodes,
            bindings={n: v.node for n, v in self.binding_values.items() if isinstance(v, _Ref)},
            chain=self.r.chain,
        )
        self._check_program(prog)
        prog.config = self._configs()
        self._check_unused()
        self._check_needs(prog)
        prog.needs = frozenset().union(*(n.needs for n in self.nodes.values())) if self.nodes else frozenset()
        return prog

    # --- params: compile-time constants
    def _param(self, name: str) -> _Const | None:
        if name in self.param_values:
            return self.param_values[name]
        if name in self.in_progress or name in self.cyclic:
            return None
        self.in_progress.append(name)
        p = self.r.params[name]
        value = self._expr(p.value, owner=None)
        self.in_progress.pop()
        if isinstance(value, _Ref):
            self.diags.error(p.value.span, "E308", f"param '{name}' must be a constant, but its value is {value.type}",
                             "a param is a number, string, boolean or list; name stage outputs with a binding")
            value = None
        self.param_values[name] = value
        return value

    # --- bindings
    def _binding(self, name: str) -> _Value:
        if name in self.binding_values:
            return self.binding_values[name]
        if name in self.in_progress or name in self.cyclic:
            return None
        self.in_progress.append(name)
        b = self.r.bindings[name]
        value = self._expr(b.value, owner=name, root=True)
        self.in_progress.pop()
        if isinstance(value, _Const):
            self.diags.error(b.value.span, "E307", f"binding '{name}' is a constant ({value.type}); a binding names "
                             "a stage's output", f"write 'param {name} = ...' for a constant")
            value = None
        if isinstance(value, _Ref):
            allowed = T.KIND_TYPES[b.kind]
            if value.type.base not in allowed:
                self.diags.error(
                    b.kind_span.to(b.name_span), "E301",
                    f"'{name}' is declared {b.kind}, which must be {' or '.join(allowed)}, but its value is "
                    f"{T.describe(value.type)}",
                    self._kind_hint(b.kind, value.type),
                )
                value = None
            else:
                node = self.nodes[value.node]
                if node.binding is None:
                    self.nodes[value.node] = _with(node, binding=name, kind=b.kind)
                else:  # an alias: `reward r = other`; give the alias a node of its own
                    alias = self._new_node(name, "alias", None, {}, (("value", value.node),), value.type,
                                           b.value.span, root=True)
                    self.nodes[alias] = _with(self.nodes[alias], binding=name, kind=b.kind)
                    value = _Ref(alias, value.type)
        self.binding_values[name] = value
        return value

    @staticmethod
    def _kind_hint(kind: str, t: T.Type) -> str | None:
        if kind == "objective" and t.base in ("Advantage", "Signal"):
            return "an objective is a Loss: wrap it in a loss stage, e.g. losses.ppo_clip(adv, groups)"
        if kind == "advantage" and t.base == "Signal":
            return "turn the signal into an advantage with an estimator, e.g. grpo(r, groups)"
        for other, bases in T.KIND_TYPES.items():
            if t.base in bases:
                return f"declare it as '{other}' instead" if other != "verify" else "declare it as 'reward' or 'verify'"
        return None

    def _dependency_order(self) -> list[str]:
        """Params and bindings, each after the names it uses (iterative DFS); cycles are
        reported here, once each, and their members are left out."""
        defined = {**self.r.params, **self.r.bindings}
        deps = {
            name: [n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name) and n.id in defined]
            for name, stmt in defined.items()
        }
        state: dict[str, int] = {}  # 1 on the path, 2 done
        order: list[str] = []
        for root in defined:
            if root in state:
                continue
            state[root] = 1
            path, stack = [root], [iter(deps[root])]
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    stack.pop()
                    done = path.pop()
                    state[done] = 2
                    if done not in self.cyclic:
                        order.append(done)
                elif state.get(nxt) == 1:
                    self._cycle(path[path.index(nxt):] + [nxt])
                elif nxt not in state:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(deps[nxt]))
        for member in self.cyclic:  # what a cycle's members use is not "unused"
            self.used_names.update(deps[member])
        return order

    def _cycle(self, members: list[str]) -> None:
        if all(m in self.cyclic for m in members):
            return
        self.cyclic.update(members)
        defined = {**self.r.params, **self.r.bindings}
        first = min(members[:-1], key=lambda m: (defined[m].span.file, defined[m].span.line, defined[m].span.column))
        i = members.index(first)
        loop = members[i:-1] + members[:i] + [first]  # start the loop at the first one in the file
        shown = " → ".join(loop) if len(loop) <= 12 else " → ".join(loop[:10]) + f" → … ({len(loop) - 1} members)"
        self.diags.error(defined[first].name_span, "E503", f"cycle: {shown}",
                         "a binding or param cannot depend on itself, directly or through others")

    # --- expressions
    def _expr(self, e: ast.Expr, owner: str | None, root: bool = False) -> _Value:
        if isinstance(e, ast.Invalid):
            return None  # reported by the parser
        if isinstance(e, (ast.Number, ast.String, ast.Bool, ast.NoneLit)):
            return _Const(e.value, _const_type(e.value))
        if isinstance(e, ast.ListLit):
            items = [self._expr(i, owner) for i in e.items]
            if any(i is None for i in items):
                return None
            refs = [i for i, v in zip(e.items, items) if isinstance(v, _Ref)]
            if refs:
                self.diags.error(refs[0].span, "E308", "a list holds constants, not stage outputs")
                return None
            return _Const([i.value for i in items], T.Type("List"))
        if isinstance(e, ast.Name):
            return self._name(e, owner)
        if isinstance(e, ast.Call):
            return self._call(e, owner, root)
        if isinstance(e, ast.Neg):
            v = self._expr(e.operand, owner)
            if v is None:
                return None
            try:
                t = T.unary_minus(v.type)
            except T.TypeRuleError as err:
                self.diags.error(e.span, "E300", err.message, err.hint)
                return None
            if isinstance(v, _Const):
                return _Const(-v.value, t)
            return _Ref(self._new_node(owner, "neg", None, {}, (("operand", v.node),), t, e.span, root), t)
        if isinstance(e, ast.BinOp):
            return self._binop(e, owner, root)
        raise TypeError(f"unknown expression {type(e).__name__}")  # pragma: no cover - grammar guarantees

    def _name(self, e: ast.Name, owner: str | None) -> _Value:
        self.used_names.add(e.id)
        if e.id in self.r.poisoned:
            return None  # its definition is already reported
        if e.id in self.r.params:
            return self._param(e.id)
        if e.id in self.r.bindings:
            if owner is None:  # inside a param or config value
                self.diags.error(e.span, "E308", f"'{e.id}' is a binding; only params and constants can be used here")
                return None
            return self._binding(e.id)
        if e.id in self.reg:
            self.diags.error(e.span, "E207", f"stage '{e.id}' is used as a value; call it",
                             f"signature: {_signature(self.reg[e.id])}")
            return None
        close = difflib.get_close_matches(e.id, list(self.r.params) + list(self.r.bindings), n=1, cutoff=0.6)
        self.suggested.update(close)  # the user meant it: do not also call it unused
        hint = f"did you mean '{close[0]}'?" if close else "define it with a binding or a param"
        self.diags.error(e.span, "E200", f"unknown name '{e.id}'", hint)
        return None

    def _binop(self, e: ast.BinOp, owner: str | None, root: bool) -> _Value:
        left, right = self._expr(e.left, owner), self._expr(e.right, owner)
        if left is None or right is None:
            return None
        try:
            t = T.binary(e.op, left.type, right.type)
        except T.TypeRuleError as err:
            self.diags.error(e.op_span, "E300", err.message, err.hint)
            return None
        if isinstance(left, _Const) and isinstance(right, _Const):
            if e.op == "/" and right.value == 0:
                self.diags.error(e.right.span, "E300", "division by zero")
                return None
            try:
                value = _FOLD[e.op](left.value, right.value)
            except OverflowError:
                value = float("inf")
            if abs(value) > _FLOAT_MAX or not math.isfinite(value):  # huge ints could grow without bound
                self.diags.error(e.span, "E104", "constant expression overflows a float")
                return None
            return _Const(value, t)
        inputs, consts = [], {}
        for side, v in (("left", left), ("right", right)):
            if isinstance(v, _Ref):
                inputs.append((side, v.node))
            else:
                consts[side] = v.value
        if e.op == "/" and consts.get("right") == 0:
            self.diags.error(e.right.span, "E300", "division by zero")
            return None
        return _Ref(self._new_node(owner, OPS[e.op], None, consts, tuple(inputs), t, e.span, root), t)

    def _call(self, e: ast.Call, owner: str | None, root: bool) -> _Value:
        if e.func not in self.reg:
            hint = _suggest(e.func, self.reg.names())
            known = "shapeflow stages lists them"
            self.diags.error(e.func_span, "E201", f"unknown stage '{e.func}'", hint or known)
            for a in e.args + tuple(k.value for k in e.kwargs):
                self._expr(a, owner)  # still check (and mark used) the arguments
            return None
        st = self.reg[e.func]
        if owner is None:
            self.diags.error(e.span, "E308", f"stage '{e.func}' cannot be called here; only constants are allowed",
                             "call stages in bindings")
            return None
        ok = True
        inputs: dict[str, _Ref] = {}
        params: dict[str, tuple[Any, Span]] = {}
        notes: dict[str, str] = {}
        slots = list(st.input_names()) + list(st.param_names())

        def assign(slot: str, expr: ast.Expr, span: Span) -> None:
            nonlocal ok
            if slot in inputs or slot in params:
                if span.file == COMMAND_LINE:  # `--set BINDING.ARG=V` overrides an argument given by position
                    inputs.pop(slot, None)
                    params.pop(slot, None)
                else:
                    self.diags.error(span, "E306", f"argument '{slot}' of '{e.func}' is given twice")
                    ok = False
                    return
            v = self._expr(expr, owner)
            if v is None:
                ok = False
                return
            if slot in st.input_names():
                declared = dict(st.inputs)[slot]
                if isinstance(v, _Const):
                    self.diags.error(expr.span, "E302", f"input '{slot}' of '{e.func}' must be {declared}, "
                                     f"got a constant {v.type}", None)
                    ok = False
                elif not T.accepts(declared, v.type):
                    self.diags.error(expr.span, "E302",
                                     f"input '{slot}' of '{e.func}' must be {T.describe(declared)}, got "
                                     f"{T.describe(v.type)}", _input_hint(declared, v.type))
                    ok = False
                else:
                    inputs[slot] = v
            else:
                if isinstance(v, _Ref):
                    self.diags.error(expr.span, "E308", f"parameter '{slot}' of '{e.func}' must be a constant, got "
                                     f"{v.type}", f"inputs of '{e.func}' are: {', '.join(st.input_names()) or 'none'}")
                    ok = False
                else:
                    params[slot] = (v.value, expr.span)
                    if isinstance(expr, ast.Name) and expr.id in self.r.params:
                        notes[slot] = self._param_origin(expr.id)

        for i, arg in enumerate(e.args):
            if i >= len(slots):
                self.diags.error(arg.span, "E303", f"'{e.func}' takes at most {len(slots)} positional arguments "
                                 f"({', '.join(slots) or 'none'}), got {len(e.args)}")
                ok = False
                break
            assign(slots[i], arg, arg.span)
        for kw in e.kwargs:
            if kw.name not in slots:
                valid = ", ".join(st.param_names()) or "none"
                sugg = _suggest(kw.name, slots)
                hint = (sugg + " " if sugg else "") + f"valid parameters: {valid}"
                self.diags.error(kw.name_span, "E402", f"unknown parameter '{kw.name}' for stage '{e.func}'", hint)
                self._expr(kw.value, owner)
                ok = False
                continue
            assign(kw.name, kw.value, kw.span)
        for name, t in st.inputs:
            if name not in inputs and ok:
                self.diags.error(e.span, "E304", f"'{e.func}' needs its input '{name}' ({t})",
                                 f"signature: {_signature(st)}")
                ok = False
        validated = self._validate_params(st.params, params, e.func_span, f"stage '{e.func}'",
                                          f"parameter '{{}}' of '{e.func}'", notes)
        if not ok or validated is None:
            return None
        out_type = st.output
        if out_type.level == "*":
            levels = [inputs[n].type.level for n, t in st.inputs if t.level == "*"]
            out_type = T.Type(out_type.base, T.finest(*levels))
        node_inputs = tuple((n, inputs[n].node) for n, _ in st.inputs)
        node_id = self._new_node(owner, "stage", st.name, validated, node_inputs, out_type, e.span, root, st)
        return _Ref(node_id, out_type)

    def _param_origin(self, name: str) -> str:
        p = self.r.params[name]
        if name in self.r.set_params:
            return f" (from param '{name}', set on the command line: --set {name}=...)"
        return f" (from param '{name}', {p.span.file}:{p.span.line})"

    def _validate_params(self, model, given: dict[str, tuple[Any, Span]], where: Span, owner: str, label: str,
                         notes: dict[str, str] | None = None):
        """Validate with the pydantic model; each error points at the offending value."""
        values = {k: v for k, (v, _) in given.items()}
        quick = quick_validate(model, values)  # no pydantic schema for what is surely valid
        if quick is not None:
            return quick
        try:
            return model.model_validate(values).model_dump()
        except ValidationError as exc:
            for err in exc.errors():
                loc = err["loc"]
                key = str(loc[0]) if loc else ""
                span = given[key][1] if key in given else where
                before = len(self.diags.items)
                what = label.format(key) if key else owner
                if len(loc) > 1 and isinstance(loc[1], int):
                    what += f" (item {loc[1] + 1})"
                self._param_error(model, key, err, span, owner, what)
                note = (notes or {}).get(key)
                if note and len(self.diags.items) > before:
                    d = self.diags.items[-1]
                    self.diags.items[-1] = type(d)(d.span, d.severity, d.code, d.message + note, d.hint)
            return None

    def _param_error(self, model, key: str, err: dict, span: Span, owner: str, what: str) -> None:
        kind = err["type"]
        info = model.model_fields.get(key)
        got = err.get("input")
        if kind == "extra_forbidden":
            valid = ", ".join(model.model_fields)
            sugg = _suggest(key, list(model.model_fields))
            noun = "key" if owner.endswith("block") else "parameter"
            self.diags.error(span, "E402", f"unknown {noun} '{key}' for {owner}",
                             (sugg + " " if sugg else "") + f"valid {noun}s: {valid}")
        elif kind == "missing":
            self.diags.error(span, "E403", f"{what} is required", info.description if info else None)
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
            self.diags.error(span, "E401", f"{what} must be {bounds(info)}, got {_show(got)}", info.description)
        elif kind.endswith("_type"):
            expected = type_words(info) if info else kind.removesuffix("_type")
            self.diags.error(span, "E400", f"{what} must be {_article(expected)}, got {_show(got)}",
                             info.description if info else None)
        elif kind == "literal_error":
            options = [o.strip("'") for o in err["ctx"]["expected"].replace(" or ", ", ").split(", ")]
            sugg = _suggest(got, options) if isinstance(got, str) else None
            if got is None and "none" in options:
                sugg = 'write the string "none" (quoted); a bare none means no value'
            self.diags.error(span, "E401", f"{what} must be one of {err['ctx']['expected']}, got {_show(got)}",
                             sugg or (info.description if info else None))
        elif kind in ("too_long", "too_short"):
            ctx = err.get("ctx", {})
            limit = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
            n = ctx.get("actual_length", len(got) if hasattr(got, "__len__") else "?")
            unit = "items" if isinstance(got, list) else "characters"
            bound = "at most" if kind == "too_long" else "at least"
            self.diags.error(span, "E401", f"{what} must have {bound} {limit} {unit}, got {n}",
                             info.description if info else None)
        else:  # validators (regex, cross-field rules)
            msg = err["msg"].removeprefix("Value error, ")
            self.diags.error(span, "E401", f"{what}: {msg}" if key else f"{owner}: {msg}", None)

    def _new_node(self, owner, op, stage_name, params, inputs, t, span, root, st: Stage | None = None) -> str:
        base = owner if owner is not None else "_"
        if root and base not in self.nodes:
            node_id = base  # a binding's value is the node named after it
        else:
            self.counter[base] = self.counter.get(base, 0) + 1
            node_id = f"{base}#{self.counter[base]}"
        # Phase: declared by the stage; operators follow their inputs.
        in_phases = [self.nodes[src].phase for _, src in inputs]
        if st is not None:
            phase = st.phase
            later = [(arg, self.nodes[src]) for arg, src in inputs if _PHASE_ORDER[self.nodes[src].phase] > _PHASE_ORDER[phase]]
            if later:
                arg, src = later[0]
                self.diags.error(span, "E505", f"'{st.name}' runs in the {phase} phase, but its input '{arg}' "
                                 f"('{src.binding or src.label}') is computed in the {src.phase} phase",
                                 f"a {phase}-phase stage can only use values computed before the {src.phase} phase")
        else:
            phase = max(in_phases, key=_PHASE_ORDER.get, default="rollout")
        self.nodes[node_id] = Node(
            id=node_id, op=op, stage=stage_name, params=params, inputs=inputs, type=t, phase=phase,
            needs=resolve_needs(st.needs, params) if st else frozenset(), binding=None, kind=None, span=span, order=len(self.nodes),
        )
        return node_id

    # --- whole-program rules
    def _check_program(self, prog: Program) -> None:
        objectives = [b for b in self.r.bindings.values() if b.kind == "objective"]
        rollouts = [b for b in self.r.bindings.values() if b.kind == "rollout"]
        if not rollouts:
            self.diags.error(Span.whole_file(self.r.file), "E500", "spec has no rollout binding",
                             "add e.g. 'rollout groups = rollouts.sample(policy, prompts, n = 8)'")
        if not objectives:
            self.diags.error(Span.whole_file(self.r.file), "E501", "spec has no objective binding",
                             "add e.g. 'objective loss = losses.ppo_clip(adv, groups)'")
        for extra in objectives[1:]:
            self.diags.error(extra.kind_span.to(extra.name_span), "E502",
                             f"more than one objective: '{objectives[0].name}' (line {objectives[0].span.line}) "
                             f"and '{extra.name}'", "combine them into one: objective loss = a + 0.1 * b")

    def _configs(self) -> dict[str, BaseModel]:
        out = {}
        for block, model in CONFIG_BLOCKS.items():
            given: dict[str, tuple[Any, Span]] = {}
            ok = True
            for key, entry in self.r.configs[block].items():
                v = self._expr(entry.value, owner=None)
                if v is None:
                    ok = False
                    continue
                given[key] = (v.value, entry.value.span if key in model.model_fields else entry.key_span)
            validated = self._validate_params(model, given, Span.whole_file(self.r.file), f"the {block} block",
                                              f"{block}.{{}}")
            if validated is not None and ok:
                instance = quick_instance(model, validated)  # None: pydantic decides, as before
                out[block] = instance if instance is not None else model.model_validate(validated)
        return out

    def _check_unused(self) -> None:
        """Warn about the top spec's own unused definitions (a parent's may be unused by design)."""
        top = self.r.file
        needed = set().union(*(n.needs for n in self.nodes.values())) if self.nodes else set()
        for name, b in self.r.bindings.items():
            if b.span.file != top:
                continue
            if self.binding_values.get(name) is None:
                continue  # its own error says enough
            node = self.nodes.get(name)
            if node is not None and node.op == "stage" and self.reg[node.stage].provides & needed:
                continue  # a critic: used through the needs it supplies
            if b.kind != "objective" and name not in self.used_names | self.suggested:
                self.diags.warning(b.name_span, "W100", f"binding '{name}' is never used",
                                   "use it in the objective, or remove it")
        for name, p in self.r.params.items():
            if name not in self.used_names | self.suggested and p.span.file == top:
                self.diags.warning(p.name_span, "W101", f"param '{name}' is never used")

    def _check_needs(self, prog: Program) -> None:
        """Each stage's needs must be provided by the engine of every rollout it depends on."""
        for node in self.nodes.values():
            if node.op == "stage" and self.reg[node.stage].engine_param:
                st = self.reg[node.stage]
                prog.engines[node.id] = node.params[st.engine_param]
        self.engines = prog.engines
        supplied = {need: nid for nid, node in self.nodes.items() if node.op == "stage"
                    for need in self.reg[node.stage].provides}
        for node in self.nodes.values():
            for need in sorted(n for n in node.needs if need_info(n).provider == "model" and n not in supplied):
                makers = sorted(s.name for s in self.reg.stages.values() if need in s.provides)
                self.diags.error(node.span, "E701", f"'{node.stage}' needs '{need}' ({need_info(need).doc}), and "
                                 "no model in this spec supplies it",
                                 f"declare a model that does ({', '.join(makers) or 'none registered'})")
        for node in self.nodes.values():
            if not node.needs:
                continue
            for rid in self._upstream_rollouts(node.id):
                engine = self.reg.engines.get(prog.engines[rid])
                provided = engine.provides if engine else frozenset()
                for need in sorted(n for n in node.needs if n not in provided and not provided_by_trainer(n)):
                    self.diags.error(
                        node.span, "E700",
                        f"'{node.stage}' needs '{need}' ({need_info(need).doc}), which rollout engine "
                        f"'{prog.engines[rid]}' (binding '{self.nodes[rid].binding or rid}') does not provide",
                        "engines that do: " + (", ".join(sorted(
                            e.name for e in self.reg.engines.values() if need in e.provides)) or "none yet"),
                    )

    def _upstream_rollouts(self, node_id: str) -> list[str]:
        out, stack, seen = [], [node_id], set()
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            node = self.nodes[nid]
            if nid != node_id and nid in self.engines:  # a generating stage: where the needs come from
                out.append(nid)
                continue
            stack.extend(src for _, src in node.inputs)
        return out


_PHASE_ORDER = {"setup": 0, "rollout": 1, "update": 2}
_FOLD = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_FLOAT_MAX = 1.7976931348623157e308


def _with(node: Node, **changes) -> Node:
    from dataclasses import replace

    return replace(node, **changes)


def _signature(st: Stage) -> str:
    return f"{st.name}(" + ", ".join([f"{n}: {t}" for n, t in st.inputs] + [f"{p} = ..." for p in st.param_names()]) + ")"


def _input_hint(declared: T.Type, actual: T.Type) -> str | None:
    if declared.base == "Advantage" and actual.base == "Signal":
        return "a Signal is reward-like; pass it through an advantage estimator first, e.g. grpo(r, groups)"
    if declared.level == "seq" and actual.level == "tok":
        return f"this input takes one value per response; reduce the {actual.base}[tok] to [seq] first"
    return None


_show = ast.show_value


def _article(words: str) -> str:
    return ("an " if words[:1] in "aeiou" else "a ") + words


def check(resolved: Resolved, registry: Registry, diags: Diagnostics) -> Program:
    return Checker(resolved, registry, diags).run()
