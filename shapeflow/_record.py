"""Frozen record classes: what ``@dataclass(frozen=True)`` gives, without its code generation.

``dataclass()`` writes out and compiles an ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``,
``__setattr__`` and ``__delattr__`` for every class it decorates, about 0.4 ms a class at
import; `shapeflow check` imports some thirty frozen classes (the AST, spans, diagnostics,
types, checked nodes, stages), which came to ~5% of its run. ``@record`` still makes the class
a dataclass (``dataclasses.fields``, ``replace`` and ``asdict`` work; ``__match_args__`` and
``__slots__`` are as before) but takes those six methods from :class:`Record`, written once.

Instances behave as those of ``@dataclass(frozen=True)``: the same constructor (positional or
keyword, defaults), repr, equality (same class and equal fields), hash, and
``FrozenInstanceError`` on assignment or deletion. They pickle and copy as ``cls(*values)``,
which also loads much faster than the frozen-dataclass default. Only plain fields are
supported (no ``field(...)`` options): anything else is refused when the class is made.
tests/test_record.py compares them with real frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import MISSING, FrozenInstanceError, dataclass, fields
from operator import attrgetter
from typing import Any

_set = object.__setattr__


class Record:
    """Base of :func:`record` classes: the methods ``@dataclass(frozen=True)`` would generate."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()  # set by @record, in declaration order
    _defaults: dict[str, Any] = {}
    _get = staticmethod(lambda obj: ())  # obj -> its field values as a tuple (set by @record)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__qualname__}() takes {len(names)} positional arguments but "
                            f"{len(args)} were given")
        for name, value in zip(names, args):
            _set(self, name, value)
        if len(args) < len(names) or kwargs:
            defaults = self._defaults
            for name in names[len(args):]:
                if name in kwargs:
                    _set(self, name, kwargs.pop(name))
                elif name in defaults:
                    _set(self, name, defaults[name])
                else:
                    raise TypeError(f"{type(self).__qualname__}() missing required argument: '{name}'")
            if kwargs:
                name = next(iter(kwargs))
                problem = "got multiple values for argument" if name in names else "got an unexpected keyword argument"
                raise TypeError(f"{type(self).__qualname__}() {problem} '{name}'")

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self._get(self)))
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._get(self) == other._get(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._get(self))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self):
        return type(self), self._get(self)


def record(cls: type | None = None, /, *, slots: bool = False):
    """Class decorator: ``cls`` (a subclass of :class:`Record`) as a frozen dataclass."""

    def wrap(cls: type) -> type:
        if not issubclass(cls, Record):
            raise TypeError(f"@record class {cls.__qualname__} must derive from Record")
        if not cls.__dict__.get("__doc__"):  # the signature text dataclass() would write, without inspect
            args = [f"{name}: {ann!r}" + (f" = {cls.__dict__[name]!r}" if name in cls.__dict__ else "")
                    for name, ann in cls.__dict__.get("__annotations__", {}).items()]
            cls.__doc__ = f"{cls.__name__}({', '.join(args)})"
        cls = dataclass(init=False, repr=False, eq=False, slots=slots)(cls)
        declared = fields(cls)
        for f in declared:
            if (f.default_factory is not MISSING or not f.init or not f.repr or not f.compare
                    or f.hash is not None or f.kw_only is True):
                raise TypeError(f"{cls.__qualname__}.{f.name}: @record supports plain fields with plain defaults")
        cls._fields = tuple(f.name for f in declared)
        cls._defaults = {f.name: f.default for f in declared if f.default is not MISSING}
        if len(declared) == 1:
            get = attrgetter(declared[0].name)
            cls._get = staticmethod(lambda obj: (get(obj),))
        elif declared:
            cls._get = staticmethod(attrgetter(*cls._fields))
        return cls

    return wrap if cls is None else wrap(cls)
