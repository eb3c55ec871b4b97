"""Which files, in which order, under which names (mec_hub.embedding.inputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mec_hub.embedding.inputs import InputError, collect_inputs


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in ("b.jpg", "a/z.png", "a/y.JPG", "c/d/e.webp", "notes.txt", ".hidden.jpg", ".cache/x.jpg"):
        touch(root / rel)
    return root


def test_single_folder_sorted_walk_relative_names(tree: Path):
    got = collect_inputs([str(tree)])
    assert [i.name for i in got.items] == ["a/y.JPG", "a/z.png", "b.jpg", "c/d/e.webp"]
    assert [i.path for i in got.items] == [str(tree / i.name) for i in got.items]
    assert got.skipped == 1  # notes.txt; hidden files are not counted, not taken
    assert got.base_dir == str(tree)


def test_no_recursion(tree: Path):
    assert [i.name for i in collect_inputs(str(tree), recursive=False).items] == ["b.jpg"]


def test_several_inputs_keep_their_order_and_are_named_as_given(tree: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tree.parent)
    got = collect_inputs(["data/c", "data/b.jpg", "data/notes.txt", "data/a"])
    # a file named explicitly is taken whatever its extension; folders are prefixed as the user named them
    assert [i.name for i in got.items] == [
        os.path.join("data/c", "d/e.webp"), "data/b.jpg", "data/notes.txt", "data/a/y.JPG", "data/a/z.png",
    ]
    assert got.base_dir == str(tree.parent)


def test_duplicates_are_kept_once_where_first_seen(tree: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tree)
    got = collect_inputs(["b.jpg", ".", "./b.jpg", str(tree / "a" / "z.png")])
    names = [i.name for i in got.items]
    assert names == ["b.jpg", "./a/y.JPG", "./a/z.png", "./c/d/e.webp"]
    assert len({i.path for i in got.items}) == len(got.items)


def test_glob_patterns(tree: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tree)
    got = collect_inputs(["**/*.png", "*.jpg"])
    assert [i.name for i in got.items] == ["a/z.png", "b.jpg"]
    with pytest.raises(InputError, match="no file matches the pattern"):
        collect_inputs(["*.tiff"])


def test_files_from_list(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tree)
    listing = tmp_path / "list.txt"
    listing.write_text("c/d/e.webp\n\nb.jpg\r\nmissing.png\n")
    got = collect_inputs([], files_from=listing)
    # a listed file that does not exist is kept: it becomes a failed row, not a silent gap
    assert [i.name for i in got.items] == ["c/d/e.webp", "b.jpg", "missing.png"]


def test_missing_inputs_are_an_error_before_anything_is_walked(tree: Path):
    with pytest.raises(InputError) as info:
        collect_inputs([str(tree), str(tree / "nope"), str(tree / "nope2")])
    assert "nope'" in str(info.value) and "nope2" in str(info.value)
    with pytest.raises(InputError, match="files_from="):
        collect_inputs([], files_from=tree / "no-list.txt")


def test_symlinked_folders_are_followed_without_loops(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "real" / "a.png")
    (root / "link").symlink_to(root / "real")
    (root / "real" / "loop").symlink_to(root)
    got = collect_inputs(str(root))
    # each real folder is walked once, under the first name the sorted walk meets it by
    assert [i.name for i in got.items] == ["link/a.png"]


def test_digest_changes_with_the_list(tree: Path):
    first = collect_inputs(str(tree)).digest()
    assert collect_inputs(str(tree)).digest() == first
    touch(tree / "new.png")
    assert collect_inputs(str(tree)).digest() != first
