"""The stage registry: every stage a spec can call, with its declared contract.

A stage is one function registered with :func:`stage`. The declaration names its kind, its
typed inputs (positional parameters of the function, in order), its output type, a pydantic
model of its parameters (keyword-only parameters of the function, one per field), what it
needs from the rollout, the phase it runs in and its paper. The contract is checked when the
stage registers, so the compiler and the runtime can rely on it and never branch on a
stage's name.

Importing this module (and the stdlib stage modules) never imports torch: stage bodies reach
torch through :mod:`shapeflow._lazy`.

Third-party stages arrive as installed plug-ins: an entry point in the group
``shapeflow.stages`` naming either a module (importing it registers its stages with the
default registry through the decorator) or a callable that takes the registry.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict

from shapeflow._record import Record, record
from shapeflow.plugins import ENTRY_POINT_GROUP, plugin_entry_points  # noqa: F401 (re-exported)
from shapeflow.compiler.types import Type, parse_type
from shapeflow.stdlib.needs import NEEDS, template_param

STAGE_KINDS = ("model", "data", "rollout", "verify", "reward", "signal", "advantage", "loss")
PHASES = ("setup", "rollout", "update")

STDLIB_MODULES = (
    "shapeflow.stdlib.models",
    "shapeflow.stdlib.tasks",
    "shapeflow.stdlib.rollouts",
    "shapeflow.stdlib.verifiers",
    "shapeflow.stdlib.task_verifiers",
    "shapeflow.stdlib.rewards",
    "shapeflow.stdlib.signals",
    "shapeflow.stdlib.advantages",
    "shapeflow.stdlib.losses",
    "shapeflow.stdlib.critic",
    "shapeflow.stdlib.token_baselines",
    "shapeflow.stdlib.mismatch",
    "shapeflow.stdlib.shaping",
    "shapeflow.stdlib.shaping_rewards",
    "shapeflow.stdlib.shaping_state",
    "shapeflow.stdlib.shaping_tokens",
)


class StageParams(BaseModel):
    """Base of every stage's parameter model: unknown keys and loose types are errors."""

    # defer_build: the validation schema is built on first use, so listing or checking a few
    # stages does not pay for all of them at import (`shapeflow check` startup). The checker
    # validates parameters that pass without it (stdlib/params.py, quick_validate); a value that
    # fails is validated by pydantic, whose errors make the diagnostics.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


class NoParams(StageParams):
    """A stage without parameters."""


class RegistrationError(Exception):
    """A stage whose declaration is inconsistent (raised when it registers)."""


@record
class Stage(Record):
    name: str
    kind: str
    fn: Callable[..., Any]
    inputs: tuple[tuple[str, Type], ...]
    output: Type
    params: type[StageParams]
    needs: frozenset[str]
    phase: str
    paper: str
    engine_param: str | None = None  # for rollout stages: the parameter naming the engine
    context: bool = False  # the function takes the runtime's step context as keyword `ctx`
    source: str = "shapeflow"  # "shapeflow" or the plug-in's entry-point name
    state: tuple[tuple[str, str], ...] = ()  # what it keeps across steps: (key, doc); keyword `state`
    provides: frozenset[str] = frozenset()  # model stages: needs their value supplies (a critic: values)
    # update-phase stages: the parameter ("micro", "mini" or "global") naming the rows its
    # statistics span (functional.scope_reduce); the update loop runs a pass for wider scopes
    scope_param: str | None = None
    # stateful stages: a pass over the whole training set before the first step. ``init`` takes
    # the stage's inputs and keywords (and ``state``) computed on responses of the initial policy,
    # ``init_samples`` names the parameter giving responses per prompt (0: no pass)
    init: Callable[..., Any] | None = None
    init_samples: str | None = None

    @property
    def stateful(self) -> bool:
        return bool(self.state)

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.fn.__doc__ or "")

    @property
    def summary(self) -> str:
        return self.doc.split("\n", 1)[0] if self.doc else ""

    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    def param_names(self) -> tuple[str, ...]:
        return tuple(self.params.model_fields)

    def describe(self) -> dict[str, Any]:
        """The JSON record of ``shapeflow stages --json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "inputs": {n: str(t) for n, t in self.inputs},
            "output": str(self.output),
            "params": self.params.model_json_schema(),
            "needs": sorted(self.needs),
            "phase": self.phase,
            "paper": self.paper,
            "state": dict(self.state),
            "doc": self.doc,
        }


@record
class Engine(Record):
    """A rollout engine as the checker sees it: a name and the needs it can provide."""

    name: str
    provides: frozenset[str]
    doc: str


@dataclass
class Registry:
    stages: dict[str, Stage] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    plugin_errors: list[str] = field(default_factory=list)

    def add(self, st: Stage) -> Stage:
        _verify_contract(st)
        if st.name in self.stages:
            prev = self.stages[st.name]
            raise RegistrationError(
                f"stage '{st.name}' is registered twice ({_where(prev.fn)} and {_where(st.fn)})"
            )
        self.stages[st.name] = st
        return st

    def add_engine(self, name: str, provides: Iterable[str], doc: str) -> None:
        unknown = sorted(set(provides) - NEEDS.keys())
        if unknown:
            raise RegistrationError(f"engine '{name}' provides unknown needs {unknown}")
        if name in self.engines:
            raise RegistrationError(f"engine '{name}' is registered twice")
        self.engines[name] = Engine(name, frozenset(provides), doc)

    def __contains__(self, name: str) -> bool:
        return name in self.stages

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def names(self) -> list[str]:
        return sorted(self.stages)

    def stage(self, name: str, **declaration: Any) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` under ``name`` with the declared contract."""

        def register(fn: Callable) -> Callable:
            self.add(_build(name, fn, source=_current_source, **declaration))
            return fn

        return register

    def load_plugins(self) -> None:
        """Load the ``shapeflow.stages`` entry points; failures are recorded, not raised."""
        global _current_source

        for ep in plugin_entry_points():
            _current_source = ep.name
            try:
                obj = ep.load()
                if callable(obj) and not inspect.ismodule(obj):
                    obj(self)
            except Exception as exc:  # a broken plug-in must not break `shapeflow check`
                self.plugin_errors.append(f"plug-in '{ep.name}' ({ep.value}) failed to load: {exc}")
            finally:
                _current_source = "shapeflow"


_current_source = "shapeflow"




def _where(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _build(
    name: str,
    fn: Callable,
    *,
    kind: str,
    inputs: dict[str, str],
    output: str,
    params: type[StageParams] = NoParams,
    needs: Iterable[str] = (),
    phase: Literal["setup", "rollout", "update"] = "rollout",
    paper: str = "",
    engine_param: str | None = None,
    context: bool = False,
    source: str = "shapeflow",
    state: dict[str, str] | None = None,
    provides: Iterable[str] = (),
    scope_param: str | None = None,
    init: Callable[..., Any] | None = None,
    init_samples: str | None = None,
) -> Stage:
    try:
        typed_inputs = tuple((n, parse_type(t)) for n, t in inputs.items())
        out = parse_type(output)
    except ValueError as exc:
        raise RegistrationError(f"stage '{name}': {exc}") from None
    return Stage(
        name=name,
        kind=kind,
        fn=fn,
        inputs=typed_inputs,
        output=out,
        params=params,
        needs=frozenset(needs),
        phase=phase,
        paper=paper,
        engine_param=engine_param,
        context=context,
        source=source,
        state=tuple((state or {}).items()),
        provides=frozenset(provides),
        scope_param=scope_param,
        init=init,
        init_samples=init_samples,
    )


def _verify_contract(st: Stage) -> None:
    """The declaration must match the function (pluggy-style ``_verify_hook``)."""
    where = f"stage '{st.name}' ({_where(st.fn)})"
    if not st.name or not all(part.isidentifier() for part in st.name.split(".")):
        raise RegistrationError(f"{where}: name must be dotted identifiers")
    if st.kind not in STAGE_KINDS:
        raise RegistrationError(f"{where}: kind '{st.kind}' is not one of {', '.join(STAGE_KINDS)}")
    if st.phase not in PHASES:
        raise RegistrationError(f"{where}: phase '{st.phase}' is not one of {', '.join(PHASES)}")
    if not (isinstance(st.params, type) and issubclass(st.params, StageParams)):
        raise RegistrationError(f"{where}: params must be a subclass of StageParams")
    bad = sorted(n for n in st.provides if n not in NEEDS or NEEDS[n].provider != "model")
    if bad:
        raise RegistrationError(f"{where}: provides {bad}, which are not needs a model supplies")
    unknown = sorted(n for n in st.needs if n not in NEEDS and template_param(n) is None)
    if unknown:
        raise RegistrationError(f"{where}: unknown needs {unknown}; known: {', '.join(sorted(NEEDS))}")
    for n, t in st.inputs + (("output", st.output),):
        if t.is_constant:
            raise RegistrationError(f"{where}: '{n}' has constant type {t}; constants are parameters")
    if st.output.level == "*" and not any(t.level == "*" for _, t in st.inputs):
        raise RegistrationError(f"{where}: output level '*' needs an input with level '*'")
    if st.engine_param is not None and st.engine_param not in st.params.model_fields:
        raise RegistrationError(f"{where}: engine_param '{st.engine_param}' is not a parameter")
    if st.scope_param is not None and (st.scope_param not in st.params.model_fields or st.phase != "update"):
        raise RegistrationError(f"{where}: scope_param '{st.scope_param}' must name a parameter of an "
                                "update-phase stage")
    for n in st.needs:
        param = template_param(n)
        if param is not None and param not in st.param_names():
            raise RegistrationError(f"{where}: need '{n}' names '{param}', which is not a parameter")
    if (st.init is None) != (st.init_samples is None):
        raise RegistrationError(f"{where}: init and init_samples go together")
    if st.init is not None:
        if not st.stateful or st.phase != "rollout":
            raise RegistrationError(f"{where}: an initialisation pass fills the state of a rollout-phase stage")
        if st.init_samples not in st.param_names():
            raise RegistrationError(f"{where}: init_samples '{st.init_samples}' is not a parameter")
        init_sig = inspect.signature(st.init)
        if list(init_sig.parameters) != list(inspect.signature(st.fn).parameters):
            raise RegistrationError(f"{where}: init {_where(st.init)} must take the stage function's parameters")
    overlap = set(st.input_names()) & set(st.param_names())
    if overlap:
        raise RegistrationError(f"{where}: {sorted(overlap)} are both inputs and parameters")

    sig = inspect.signature(st.fn)
    positional = [
        p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    keyword = {p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}
    variadic = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        raise RegistrationError(f"{where}: *args/**kwargs are not allowed ({', '.join(variadic)})")
    if positional != list(st.input_names()):
        raise RegistrationError(
            f"{where}: positional parameters {positional} do not match the declared inputs "
            f"{list(st.input_names())}"
        )
    fields = set(st.param_names()) | ({"ctx"} if st.context else set()) | ({"state"} if st.stateful else set())
    if "ctx" in st.param_names():
        raise RegistrationError(f"{where}: 'ctx' is reserved for the runtime context (declare context=True)")
    if "state" in st.param_names():
        raise RegistrationError(f"{where}: 'state' is reserved for the stage's own state (declare state={{...}})")
    for key, doc in st.state:
        if not (isinstance(key, str) and key.isidentifier() and isinstance(doc, str) and doc):
            raise RegistrationError(f"{where}: state must map identifier keys to a line of documentation")
    if keyword != fields:
        missing, extra = sorted(fields - keyword), sorted(keyword - fields)
        detail = "; ".join(
            part
            for part in (
                f"declared but not keyword-only in the function: {missing}" if missing else "",
                f"keyword-only in the function but not declared: {extra}" if extra else "",
            )
            if part
        )
        raise RegistrationError(f"{where}: parameters do not match the parameter model ({detail})")


# --- the default registry -----------------------------------------------------------------

REGISTRY = Registry()
_loaded = False


def stage(name: str, **declaration: Any) -> Callable[[Callable], Callable]:
    """Register a stage with the default registry. See :class:`Stage` for the fields."""
    return REGISTRY.stage(name, **declaration)


def default_registry(*, plugins: bool = True) -> Registry:
    """The registry with the standard library (and, once, the installed plug-ins) loaded."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in STDLIB_MODULES:
            importlib.import_module(module)
        if plugins:
            REGISTRY.load_plugins()
    return REGISTRY


def doc_page(st: Stage) -> str:
    """The text of ``shapeflow stages NAME``: signature, doc, parameters with bounds, paper."""
    from shapeflow.stdlib.params import describe_field

    args = [f"{n}: {t}" for n, t in st.inputs] + [f"{k}=..." for k in st.param_names()]
    lines = [f"{st.name}({', '.join(args)}) -> {st.output}", ""]
    lines.append(f"kind: {st.kind}    phase: {st.phase}    needs: {', '.join(sorted(st.needs)) or '-'}")
    if st.source != "shapeflow":
        lines.append(f"from plug-in: {st.source}")
    lines.append("")
    if st.doc:
        lines.append(st.doc)
        lines.append("")
    if st.params.model_fields:
        lines.append("Parameters:")
        for fname, info in st.params.model_fields.items():
            lines.append(f"  {describe_field(fname, info)}")
            if info.description:
                lines.extend(textwrap.wrap(info.description, 88, initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    if st.state:
        lines.append("State kept across steps (saved in checkpoints, logged as state/<binding>/<key>):")
        for key, doc in st.state:
            lines.append(f"  {key}")
            lines.extend(textwrap.wrap(doc, 88, initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    if st.init is not None:
        lines.append(f"Initialisation pass (before the first step; parameter {st.init_samples}):")
        lines.extend(textwrap.wrap(inspect.cleandoc(st.init.__doc__ or ""), 88, initial_indent="  ",
                                   subsequent_indent="  "))
        lines.append("")
    if st.paper:
        lines.append(f"Paper: {st.paper}")
    return "\n".join(lines).rstrip() + "\n"
