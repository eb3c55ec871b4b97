"""Where things are, for a test at any depth under tests/."""

from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
# Shipped with the repository: photos/ and odd-images/ (byte-identical copies of ../shared/data's),
# their origins and licences in SOURCES.md. The fixtures of tests/conftest.py point here too.
ASSETS_DIR = TESTS_DIR / "assets"
