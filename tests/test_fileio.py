"""mec_hub.fileio: the JSON helpers against the json module itself; atomic folders against a second writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mec_hub.fileio import atomic_directory, json_plain

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


def test_a_folder_another_process_published_meanwhile_is_not_replaced(tmp_path: Path):
    final = tmp_path / "entry"
    with pytest.raises(FileExistsError, match="another process"), atomic_directory(final) as mine:
        (mine / "who").write_text("mine")
        with atomic_directory(final) as theirs:  # published while mine was being written
            (theirs / "who").write_text("theirs")
    assert (final / "who").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # mine removed, nothing left behind
