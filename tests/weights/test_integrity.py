"""mec_hub/weights/integrity.py against hashlib and the file system (mutants that survived the first mutation pass)."""

from __future__ import annotations

import hashlib
import warnings

import pytest

from mec_hub.errors import ChecksumMismatchError
from mec_hub.weights.integrity import UnverifiedWeightsWarning, remove_cached_file, sha256_file, verify_sha256


def test_a_matching_digest_passes_silently_and_a_mismatch_keeps_the_file_by_default(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert sha256_file(path) == digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UNVERIFIED warning unless asked
        assert verify_sha256(path, digest.upper(), what="test weights") == digest
    with pytest.raises(ChecksumMismatchError, match=f"mismatch for {path}: expected {'0' * 64}") as caught:
        verify_sha256(path, "0" * 64, what="test weights")
    assert caught.value.path == str(path) and caught.value.actual == digest
    assert path.exists()  # removed only with remove_on_mismatch=True
    with pytest.raises(ChecksumMismatchError, match="removed from the cache"):
        verify_sha256(path, "0" * 64, what="test weights", remove_on_mismatch=True)
    assert not path.exists()


def test_unverified_weights_warn_with_their_digest(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    with pytest.warns(UnverifiedWeightsWarning, match=hashlib.sha256(b"x").hexdigest()):
        verify_sha256(path, None, what="test weights", unverified=True)


def test_removing_a_cache_link_removes_its_blob_and_a_dangling_link(tmp_path):
    blob, link = tmp_path / "blob", tmp_path / "link"
    blob.write_bytes(b"x")
    link.symlink_to(blob)
    remove_cached_file(link)
    assert not blob.exists() and not link.is_symlink()
    link.symlink_to(tmp_path / "gone")  # the blob is already missing
    remove_cached_file(link)
    assert not link.is_symlink()
    remove_cached_file(tmp_path / "never-there")  # nothing to remove is not an error
