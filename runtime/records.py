"""Immutable records for the container-start path: tuples with named fields, as collections.namedtuple makes them.

namedtuple costs every start ~5 ms here (importing `collections`, then exec() of generated source per record type);
these are built from C pieces (tuple, itemgetter properties) at the cost of a `type()` call each.
"""

from __future__ import annotations

from _operator import itemgetter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def record(name: str, field_names: str, *, defaults: tuple = ()) -> type:
    """A tuple subclass `name` with the space-separated `field_names` as read-only attributes; the last
    len(defaults) fields take these defaults. Instances have namedtuple's `_fields`, `_replace` and `_asdict`."""
    fields = tuple(field_names.split())
    if len(set(fields)) != len(fields) or not all(f.isidentifier() and not f.startswith("_") for f in fields):
        raise ValueError(f"{name}: field names must be distinct identifiers without a leading '_': {field_names!r}")
    if len(defaults) > len(fields):
        raise ValueError(f"{name}: more defaults than fields")
    default_for = dict(zip(fields[len(fields) - len(defaults):], defaults))

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(fields):
            raise TypeError(f"{name}() takes {len(fields)} fields, {len(args)} given")
        values = list(args)
        for field in fields[len(args):]:
            if field in kwargs:
                values.append(kwargs.pop(field))
            elif field in default_for:
                values.append(default_for[field])
            else:
                raise TypeError(f"{name}() is missing field {field!r}")
        if kwargs:
            raise TypeError(f"{name}() got unknown or repeated fields: {', '.join(sorted(kwargs))}")
        return tuple.__new__(cls, values)

    def __repr__(self: tuple) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={v!r}' for f, v in zip(fields, self))})"

    def _replace(self: tuple, **changes: Any) -> Any:
        return type(self)(**{**dict(zip(fields, self)), **changes})

    def _asdict(self: tuple) -> dict[str, Any]:
        return dict(zip(fields, self))

    def __getnewargs__(self: tuple) -> tuple:
        return tuple(self)

    namespace: dict[str, Any] = {"__slots__": (), "__new__": __new__, "__repr__": __repr__, "_replace": _replace,
                                 "_asdict": _asdict, "__getnewargs__": __getnewargs__, "_fields": fields,
                                 "_field_defaults": default_for}
    for index, field in enumerate(fields):
        namespace[field] = property(itemgetter(index))
    return type(name, (tuple,), namespace)
