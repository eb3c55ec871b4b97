"""Fixtures of the embedding tests: the shipped photos, their eager reference rows, and an export cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.embedding import reference_features


@pytest.fixture(scope="session")
def photos(photos_dir: Path) -> list[Path]:
    return sorted(photos_dir.iterdir())


@pytest.fixture(scope="session")
def photo_reference(tiny_weights_dir: Path, photos: list[Path]) -> np.ndarray:
    """The tiny model's rows of ``photos`` by the plainest eager forward."""
    return reference_features(tiny_weights_dir, photos)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``MEC_HUB_CACHE`` of one test module, the runtime left to its default: an export made by one test
    is found by the next (each export takes seconds), and no other module's exports are seen."""
    monkeypatch.setenv("MEC_HUB_CACHE", str(module_cache))
    monkeypatch.delenv("MEC_HUB_RUNTIME", raising=False)
    return module_cache
