"""Fixtures of the tests of training/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.images import write_noise_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 noise PNGs of 32 px in class folders: the data of the tiny runs (made once per module)."""
    return write_noise_images(tmp_path_factory.mktemp("images"))
