"""coldbrew.runtime.records: the start path's namedtuple, without collections."""

from __future__ import annotations

import copy
import pickle

import pytest

from coldbrew.runtime.records import record

Point = record("Point", "x y label", defaults=(None,))


class Named(record("Named", "name size")):
    __slots__ = ()

    def double(self) -> "Named":
        return self._replace(size=self.size * 2)


def test_fields_defaults_and_tuple_behaviour():
    p = Point(1, y=2)
    assert (p.x, p.y, p.label) == (1, 2, None) and p == (1, 2, None) and tuple(p) == (1, 2, None)
    assert repr(p) == "Point(x=1, y=2, label=None)"
    assert p._asdict() == {"x": 1, "y": 2, "label": None} and Point._fields == ("x", "y", "label")
    assert p._replace(label="a") == Point(1, 2, "a") and hash(p) == hash((1, 2, None))
    x, y, label = p
    assert (x, y, label) == (1, 2, None)
    with pytest.raises(AttributeError):
        p.x = 3  # type: ignore[misc]
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(Named("a", 1))) == Named("a", 1)
    assert Named("a", 2).double() == Named("a", 4) and type(Named("a", 2).double()) is Named


@pytest.mark.parametrize("call, message", [
    (lambda: Point(1), "missing field 'y'"),
    (lambda: Point(1, 2, 3, 4), "takes 3 fields, 4 given"),
    (lambda: Point(1, 2, x=3), "unknown or repeated fields: x"),
    (lambda: Point(1, 2, z=3), "unknown or repeated fields: z"),
    (lambda: Point(1, 2)._replace(z=1), "unknown or repeated fields: z"),
])
def test_bad_construction_is_refused(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("fields, defaults", [("a a", ()), ("a _b", ()), ("a 1b", ()), ("a", (1, 2))])
def test_bad_definitions_are_refused(fields, defaults):
    with pytest.raises(ValueError):
        record("Bad", fields, defaults=defaults)
