"""mec_hub.fileio's JSON helpers against the json module itself."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from mec_hub.fileio import json_plain

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@given(_VALUES)
def test_json_plain_is_what_a_json_round_trip_gives(value):
    plain = json_plain(value)
    assert plain == json.loads(json.dumps(value))
    assert json.dumps(plain) == json.dumps(value)  # same order, same types once written


def test_json_plain_copies_deeply():
    inner = {"a": [1, 2]}
    plain = json_plain({"x": inner})
    plain["x"]["a"].append(3)
    assert inner == {"a": [1, 2]}
