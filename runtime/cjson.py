"""JSON through the C accelerator `_json` alone, for the container-start path.

`import json` costs ~14 ms here (json.decoder compiles regular expressions, which pulls in `re` and `enum`): more
than a quarter of runc's whole start. The C scanner and encoder behind it need none of that. Valid documents parse
exactly as `json.loads` parses them; anything else is handed to `json.loads` itself, so errors carry its messages
(line and column) and its exception types.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"


class _ScannerContext:
    """The attributes `_json.make_scanner` reads: json.JSONDecoder's defaults (NaN and the infinities accepted)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def _unserializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_scan = _json.make_scanner(_ScannerContext())


def loads(document: str | bytes) -> Any:
    """The value of the JSON `document` (UTF-8 when bytes); json.JSONDecodeError (a ValueError) when malformed."""
    text = document
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return _slow_loads(document)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except (StopIteration, ValueError, SystemError):
        # On Python 3.11 the scanner describes malformed input with json.decoder's exception, looked up in
        # sys.modules only: without `json` imported it fails with SystemError. json.loads gives the real message.
        return _slow_loads(document)
    if len(text.rstrip(_WHITESPACE)) != end:  # something after the value
        return _slow_loads(document)
    return value


def dumps(value: Any, *, sort_keys: bool = False, indent: int | None = None) -> str:
    """`value` as JSON text, as json.dumps writes it; an `indent` goes through the json module (not on hot paths)."""
    if indent is not None:
        import json

        return json.dumps(value, sort_keys=sort_keys, indent=indent)
    # json.dumps' defaults: ensure_ascii, ", " and ": ", NaN allowed; a fresh markers dict detects circular
    # references (one shared between calls would keep the ids of a failed call's containers)
    encode = _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None, ": ", ", ", sort_keys,
                                False, True)
    return "".join(encode(value, 0))


def _slow_loads(document: str | bytes) -> Any:
    import json

    return json.loads(document)
