"""``pip install 'mec-hub[all]'`` installs every optional feature (every extra but ``dev``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package supports 3.10, its tests run on 3.11

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_all_covers_every_extra_but_dev():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    features = set(extras) - {"dev", "all"}
    assert {"plot", "train", "onnx", "serve", "index", "parquet"} <= features
    reached: set[str] = set()  # the distributions `all` installs
    for line in extras["all"]:
        requirement = Requirement(line)
        if requirement.name == project["name"]:  # a self-reference: mec-hub[plot,...]
            assert requirement.extras <= features, requirement.extras - features
            reached |= {Requirement(r).name for name in requirement.extras for r in extras[name]}
        else:  # an extra's requirement, listed again
            reached.add(requirement.name)
    assert reached == {Requirement(r).name for name in features for r in extras[name]}


def test_the_readme_shows_it():
    readme = (REPO_ROOT / "README.md").read_text()
    assert re.search(r"pip install '?mec-hub\[all\]'?", readme)
