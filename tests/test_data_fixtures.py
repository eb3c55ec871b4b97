"""The shared-data fixtures of conftest.py: a skip when the data is missing, but a failure under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

NEEDS_DATA = """
def test_photos(photos_dir):
    assert photos_dir.name == "photos" and photos_dir.is_dir()


def test_cifar(cifar_dir):
    assert cifar_dir.is_dir()
"""


def run_with_data(tmp_path: Path, data: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest, in a child, on a test file using the fixtures of a copy of our conftest.py."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    shutil.copy(CONFTEST, project / "conftest.py")
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


def test_missing_data_skips_outside_ci(tmp_path: Path):
    result = run_with_data(tmp_path, tmp_path / "no_such_data", ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout and f"shared data not found at {tmp_path / 'no_such_data'}" in result.stdout
    assert "passed" not in result.stdout and "error" not in result.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_data_fails_under_ci(tmp_path: Path, ci: str):
    result = run_with_data(tmp_path, tmp_path / "no_such_data", ci=ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 errors" in result.stdout and "skipped" not in result.stdout
    assert f"shared data not found at {tmp_path / 'no_such_data'}, and CI={ci} does not skip" in result.stdout


def test_under_ci_present_data_is_used_and_each_missing_part_fails(tmp_path: Path):
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)  # no cifar10-subset
    result = run_with_data(tmp_path, data, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "1 error" in result.stdout and "skipped" not in result.stdout
    assert f"shared data not found at {data / 'cifar10-subset'}" in result.stdout
