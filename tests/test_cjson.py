"""coldbrew.runtime.cjson: JSON through `_json` alone parses and writes exactly as the json module does."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from coldbrew.runtime import cjson

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json_values, st.booleans())
def test_round_trip_matches_json(value, sort_keys):
    text = cjson.dumps(value, sort_keys=sort_keys)
    assert text == json.dumps(value, sort_keys=sort_keys)
    assert cjson.loads(text) == json.loads(text)
    assert cjson.loads(text.encode()) == json.loads(text)
    assert cjson.loads(f" \n\t{text}\r\n ") == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.binary(max_size=40))
def test_any_input_parses_or_fails_as_json_does(document):
    try:
        expected = ("ok", json.loads(document))
    except (ValueError, RecursionError) as e:
        expected = ("error", type(e))
    try:
        got = ("ok", cjson.loads(document))
    except (ValueError, RecursionError) as e:
        got = ("error", type(e))
    if expected[0] == "ok" and got[0] == "ok" and isinstance(expected[1], float) and math.isnan(expected[1]):
        assert math.isnan(got[1])
    else:
        assert got == expected


def test_indent_and_nan():
    assert cjson.dumps({"a": [1]}, indent=2) == json.dumps({"a": [1]}, indent=2)
    assert math.isnan(cjson.loads("NaN")) and cjson.loads("-Infinity") == -math.inf
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        cjson.dumps({"a": {1, 2}})
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        cjson.dumps(circular)
    assert cjson.dumps([[], []]) == "[[], []]"  # a failed call leaves no stale marks behind


@pytest.mark.parametrize("document", ["", "{", '{"a": 1,}', "[1] x", "\ufeff{}", '"\\x"', "nul"])
def test_errors_without_json_imported(document):
    # The start path never imports `json`: malformed input must still give json's error, not a SystemError.
    script = ("import sys; from coldbrew.runtime import cjson\n"
              "assert 'json' not in sys.modules\n"
              "try:\n    cjson.loads(sys.argv[1])\nexcept ValueError as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", script, document], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("JSONDecodeError "), out
