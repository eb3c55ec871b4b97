"""SHA-256 of weight files, checked before anything is loaded."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from mec_hub.errors import ChecksumMismatchError

_CHUNK = 1 << 20


class UnverifiedWeightsWarning(UserWarning):
    """Weights loaded without a known SHA-256 to check them against."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove_cached_file(path: Path) -> None:
    """Remove a cached file and, for a Hugging Face cache symlink, the blob it points to."""
    try:
        if path.is_symlink():
            path.resolve().unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    except OSError:
        pass


def verify_sha256(
    path: str | os.PathLike[str],
    expected: str | None,
    *,
    what: str,
    remove_on_mismatch: bool = False,
    unverified: bool = False,
) -> str:
    """Return the file's digest, raising if it differs from ``expected``.

    ``unverified`` says that no trusted digest vouches for the file (a registry entry whose
    SHA-256 is not yet known, a download that carries none): loading goes on, with a loud warning.
    """
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        if remove_on_mismatch:
            remove_cached_file(Path(path))
        raise ChecksumMismatchError(str(path), expected.lower(), actual, removed=remove_on_mismatch)
    if unverified:
        warnings.warn(
            f"UNVERIFIED WEIGHTS: {what} ({path}) has no published SHA-256 to check it against; "
            f"its digest is {actual}. Use it only if you trust where it came from.",
            UnverifiedWeightsWarning,
            stacklevel=3,
        )
    return actual
