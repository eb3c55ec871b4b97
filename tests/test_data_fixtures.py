"""The data fixtures of conftest.py: the photos and odd images come from tests/assets whatever
MEC_HUB_TEST_DATA says; the CIFAR subset from ../shared/data, a skip when it is missing but a
failure under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONFTEST = HERE / "conftest.py"

NEEDS_DATA = """
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_photos(photos_dir):
    assert photos_dir == HERE / "assets" / "photos"  # the shipped copy, not MEC_HUB_TEST_DATA's
    assert len(list(photos_dir.iterdir())) == 18


def test_odd_images(odd_images_dir):
    assert odd_images_dir == HERE / "assets" / "odd-images"
    assert (odd_images_dir / "MANIFEST.tsv").is_file()


def test_cifar(cifar_dir):
    assert cifar_dir == Path(os.environ["MEC_HUB_TEST_DATA"]) / "cifar10-subset" and cifar_dir.is_dir()
"""


def run_with_data(
    tmp_path: Path, data: Path, ci: str | None, *, shipped: bool = True
) -> subprocess.CompletedProcess[str]:
    """pytest, in a child, on a test file using the fixtures of a copy of our conftest.py.

    ``shipped``: the child's ``assets`` folder links to tests/assets (read-only use), as in a clone.
    """
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    shutil.copy(CONFTEST, project / "conftest.py")
    if shipped and not (project / "assets").exists():
        (project / "assets").symlink_to(HERE / "assets", target_is_directory=True)
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_needs_data.py").write_text(NEEDS_DATA)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["MEC_HUB_TEST_DATA"] = str(data)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-c",
            str(project / "pytest.ini"),
            "--rootdir",
            str(project),
            str(project / "test_needs_data.py"),
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_missing_shared_data_skips_only_cifar_outside_ci(tmp_path: Path):
    result = run_with_data(tmp_path, tmp_path / "no_such_data", ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 1 skipped" in result.stdout, result.stdout
    assert f"shared data not found at {tmp_path / 'no_such_data'}" in result.stdout
    assert "error" not in result.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_shared_data_fails_under_ci(tmp_path: Path, ci: str):
    result = run_with_data(tmp_path, tmp_path / "no_such_data", ci=ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed, 1 error" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert f"shared data not found at {tmp_path / 'no_such_data'}, and CI={ci} does not skip" in result.stdout


def test_under_ci_present_data_is_used_and_each_missing_part_fails(tmp_path: Path):
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)  # an empty photos/ that must not replace the shipped one; no cifar
    result = run_with_data(tmp_path, data, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed, 1 error" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert f"shared data not found at {data / 'cifar10-subset'}" in result.stdout

    (data / "cifar10-subset").mkdir()
    result = run_with_data(tmp_path, data, ci="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


def test_missing_shipped_data_fails_even_outside_ci(tmp_path: Path):
    (tmp_path / "data" / "cifar10-subset").mkdir(parents=True)
    result = run_with_data(tmp_path, tmp_path / "data", ci=None, shipped=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 2 errors" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert f"test data not found at {tmp_path / 'project' / 'assets' / 'photos'}: it ships with" in result.stdout
