"""@record classes behave as the frozen dataclasses they replace (shapeflow/_record.py)."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from shapeflow._record import Record, record


@dataclasses.dataclass(frozen=True, slots=True)
class DSlot:
    value: int
    span: object
    depth: int = 1


@record(slots=True)
class RSlot(Record):
    value: int
    span: object
    depth: int = 1


@dataclasses.dataclass(frozen=True)
class DDict:
    name: str
    needs: frozenset = frozenset()

    @property
    def shout(self) -> str:
        return self.name.upper()


@record
class RDict(Record):
    name: str
    needs: frozenset = frozenset()

    @property
    def shout(self) -> str:
        return self.name.upper()


@dataclasses.dataclass(frozen=True, slots=True)
class DOne:
    span: object


@record(slots=True)
class ROne(Record):
    span: object


PAIRS = [(DSlot, RSlot, [(1, "s"), (1, "s", 3), (2, ("a", 1))], [{"value": 1, "span": "s", "depth": 4}]),
         (DDict, RDict, [("a",), ("a", frozenset({"x"}))], [{"name": "b"}, {"needs": frozenset(), "name": "c"}]),
         (DOne, ROne, [(None,), ((1, 2),)], [{"span": 3}])]


def _rename(text: str, d: type, r: type) -> str:
    return text.replace(d.__qualname__, r.__qualname__)


@pytest.mark.parametrize("d, r, positional, keyword", PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_record_behaves_as_the_frozen_dataclass(d, r, positional, keyword):
    assert [f.name for f in dataclasses.fields(r)] == [f.name for f in dataclasses.fields(d)]
    assert r.__match_args__ == d.__match_args__
    assert ("__slots__" in vars(d)) == ("__slots__" in vars(r))
    assert _rename(d.__doc__, d, r) == r.__doc__
    made = [(d(*a), r(*a)) for a in positional] + [(d(**k), r(**k)) for k in keyword]
    for (da, ra), (db, rb) in zip(made, made[1:] + made[:1]):
        assert _rename(repr(da), d, r) == repr(ra)
        assert (da == db) == (ra == rb) and (da != db) == (ra != rb)
        assert ra == r(*[getattr(ra, n) for n in ra._fields]) and hash(ra) == hash(da)
        assert (ra == da) is False and ra != object()
        assert dataclasses.asdict(ra) == dataclasses.asdict(da) and dataclasses.astuple(ra) == dataclasses.astuple(da)
        first = dataclasses.fields(r)[0].name
        assert dataclasses.replace(ra, **{first: getattr(rb, first)}) == r(**{**dataclasses.asdict(ra), first: getattr(rb, first)})
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            assert pickle.loads(pickle.dumps(ra, protocol=proto)) == ra
        assert copy.copy(ra) == ra and copy.deepcopy(ra) == ra
        for obj in (da, ra):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, first, 1)
            with pytest.raises(dataclasses.FrozenInstanceError):
                delattr(obj, first)
    assert hasattr(made[0][0], "__dict__") == hasattr(made[0][1], "__dict__")
    if d is DDict:
        assert made[0][1].shout == made[0][0].shout


@pytest.mark.parametrize("d, r, positional, keyword", PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_record_refuses_what_the_dataclass_refuses(d, r, positional, keyword):
    n = len(dataclasses.fields(d))
    for args, kwargs in [((), {}), ((1,) * (n + 1), {}), ((1,), {dataclasses.fields(d)[0].name: 1}),
                         ((1,) * n, {"nope": 1})]:
        with pytest.raises(TypeError):
            d(*args, **kwargs)
        with pytest.raises(TypeError):
            r(*args, **kwargs)


def test_record_refuses_field_options_it_does_not_reproduce():
    with pytest.raises(TypeError):
        @record
        class Bad(Record):
            items: list = dataclasses.field(default_factory=list)
    with pytest.raises(TypeError):
        @record
        class NotARecord:
            x: int


def test_shapeflow_records_round_trip_through_pickle():
    from pathlib import Path

    from shapeflow.dsl.diagnostics import Diagnostics
    from shapeflow.dsl.parser import parse_file

    root = Path(__file__).resolve().parents[1] / "specs"
    for f in sorted(root.rglob("*.shape")):
        spec, _ = parse_file(f, str(f), Diagnostics())
        assert pickle.loads(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)) == spec
        assert copy.deepcopy(spec) == spec
