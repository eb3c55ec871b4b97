"""The test data shipped in tests/assets: byte-identical to ../shared/data's, each file's origin and
licence in tests/assets/SOURCES.md, and none of it in the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import ASSETS_DIR, REPO_ROOT

SHIPPED = ASSETS_DIR
FOLDERS = ("photos", "odd-images")


def shipped_files() -> list[str]:
    """Every file under tests/assets's image folders, as ``folder/name``."""
    return sorted(f"{folder}/{p.name}" for folder in FOLDERS for p in (SHIPPED / folder).iterdir())


def sources_table() -> dict[str, list[str]]:
    """SOURCES.md's table rows: ``folder/name`` (the first cell, in backticks) -> the other cells."""
    rows = {}
    for line in (SHIPPED / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\|\s*`([^`]+)`\s*\|(.*)\|", line.strip())
        if match:
            assert match[1] not in rows, f"SOURCES.md lists {match[1]} twice"
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def test_the_shipped_folders_hold_what_the_tests_expect():
    files = shipped_files()
    assert sum(f.startswith("photos/") for f in files) == 18
    assert sum(f.startswith("odd-images/") for f in files) == 31  # 30 files and MANIFEST.tsv
    assert sum((SHIPPED / f).stat().st_size for f in files) < 6_000_000  # a few MB in every clone


@pytest.mark.parametrize("folder", FOLDERS)
def test_shipped_copies_are_byte_identical_to_the_shared_data(data_dir: Path, folder: str):
    shared = data_dir / folder
    if not shared.is_dir():
        pytest.skip(f"no {folder}/ in {data_dir} to compare with")
    here = SHIPPED / folder
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in shared.iterdir())
    differing = [p.name for p in sorted(shared.iterdir()) if (here / p.name).read_bytes() != p.read_bytes()]
    assert differing == [], f"tests/assets/{folder} differs from {shared}: {differing}"


def test_sources_names_every_shipped_file_with_its_licence():
    rows = sources_table()
    assert sorted(rows) == shipped_files()  # every shipped file, and no file that is not shipped
    for name, cells in rows.items():
        assert len(cells) == 2 and all(cells), f"SOURCES.md: {name} needs an origin and a licence: {cells}"
    # the licence texts that MIT-CMU and BSD-3-Clause ask to travel with the copies
    text = (SHIPPED / "SOURCES.md").read_text(encoding="utf-8")
    assert "Permission to use, copy, modify and distribute this software" in text
    assert "Copyright: 2009-2022 the scikit-image team" in text


def test_git_keeps_every_shipped_file_byte_exact():
    """No text conversion (CRLF) for any file: odd-images/ holds a text file named .jpg and the manifest."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-attr", "text", "--", *(f"tests/assets/{f}" for f in shipped_files())],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    not_binary = [line for line in result.stdout.splitlines() if not line.endswith(": text: unset")]
    assert not_binary == [], ".gitattributes must mark these -text (binary):\n" + "\n".join(not_binary)


def test_the_wheel_does_not_ship_the_test_data(tmp_path: Path):
    # Build from a copy of the wheel's inputs plus tests/assets, so that nothing is written into the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "mec_hub", source / "mec_hub", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SHIPPED, source / "tests" / "assets")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "--wheel-dir", str(tmp_path / "dist"), str(source)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("mec_hub/") for n in names)
    shipped_names = {Path(f).name for f in shipped_files()}
    leaked = [n for n in names if n.startswith("tests/") or Path(n).name in shipped_names]
    assert leaked == [], f"the wheel holds test data: {leaked[:10]}"
