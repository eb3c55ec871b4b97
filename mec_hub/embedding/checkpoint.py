"""Progress of one process, saved after every batch, so that a killed run continues where it was.

After each batch the rows are appended to the part file, failures to the failed log, both are
synced to disk, and only then is the small state file replaced (atomically) with the new counts.
Whatever the moment of a kill, the state names a prefix of what is on disk; resuming cuts the
part files back to that prefix and goes on from the next batch, so the result is the same as an
uninterrupted run.

The state also holds the run's fingerprint (inputs digest, model digest, every option that
changes the numbers); a resume with a different fingerprint is refused, naming what changed. And
it holds the run's id, which the finished meta file records too: finals with another id (older
outputs that an interrupted ``--overwrite`` was replacing) never pass for this run's result.

Partial files that do not read back as written (cut short, overwritten, not this module's) are a
``ResumeError`` naming the file, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mec_hub.errors import MalformedFileError, MecHubError
from mec_hub.fileio import atomic_write_json, parse_json, read_json

STATE_VERSION = 1

# Fingerprint keys, and how to name them to a user who changed one.
FINGERPRINT_LABELS = {
    "inputs_sha256": "the list of input files",
    "num_inputs": "the number of input files",
    "weights_sha256": "the model weights",
    "state_dict_sha256": "the model weights",
    "head": "head=",
    "embed_dim": "the feature dimension",
    "preprocessing": "the model's preprocessing",
    "precision": "precision=",
    "normalize": "normalize=",
    "out_dtype": "out_dtype=",
    "optimizations": "the model's inference rewrites (Embedder optimize=)",
    "batch_size": "batch_size=",
    "world_size": "the number of processes (torchrun --nproc_per_node x nodes)",
    "decoding": "image decoding (Pillow version or its pixel limit, PIL.Image.MAX_IMAGE_PIXELS)",
    "mec_hub_version": "the mec-hub version",
}
# The Python arguments the labels above name (``MecHubError.arguments``).
FINGERPRINT_ARGUMENTS = ("head", "precision", "normalize", "out_dtype", "batch_size")


class ResumeError(MecHubError):
    """An unfinished run that cannot be continued with the options given."""


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprints."""
    changes = []
    seen_labels = set()
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        label = FINGERPRINT_LABELS.get(key, key)
        if label in seen_labels:
            continue
        seen_labels.add(label)
        if key in ("inputs_sha256", "weights_sha256", "state_dict_sha256", "preprocessing", "decoding"):
            changes.append(f"{label} changed")
        else:
            changes.append(f"{label} was {old.get(key)!r}, now {new.get(key)!r}")
    return changes


@dataclass
class PartState:
    """Checkpoint of one process: its slice ``[start, end)`` and how far it got."""

    fingerprint: dict[str, Any]
    start: int
    end: int
    items_done: int  # absolute index of the next item to embed
    rows_done: int
    failed_bytes: int  # length of the failed log covered by this checkpoint
    started_at: str
    version: int = STATE_VERSION
    run_id: str = ""  # the same in every process of a run, and in the meta file it publishes
    # Set on the first process's state just before its joined .npy is renamed to the final name:
    # ``features_ends_sha256`` of that file, by which a resume recognises it there.
    publishing: str | None = None

    @property
    def complete(self) -> bool:
        return self.items_done >= self.end

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> PartState:
        try:
            data = read_json(path)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"state version {data.get('version')!r}")
            state = cls(**data)
            state._check()
            return state
        except (OSError, ValueError, TypeError, MalformedFileError) as exc:
            raise ResumeError(
                f"the progress file {path} of the unfinished run is unreadable ({exc}); start over with overwrite=True",
                arguments=("overwrite",),
            ) from None

    def _check(self) -> None:
        """Every field of the type it is written with, and the counts in order."""
        counts = (self.start, self.end, self.items_done, self.rows_done, self.failed_bytes)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise ValueError("its counts are not whole numbers")
        if not (self.start <= self.items_done <= self.end and self.rows_done <= self.items_done - self.start):
            raise ValueError("its counts contradict each other")
        if not isinstance(self.fingerprint, dict) or not isinstance(self.started_at, str):
            raise ValueError("fingerprint or started_at of the wrong type")
        if not isinstance(self.run_id, str) or not isinstance(self.publishing, str | None):
            raise ValueError("run_id or publishing of the wrong type")


def append_failures(fh: Any, failures: list[tuple[int, str]]) -> None:
    for index, reason in failures:
        fh.write((json.dumps({"index": index, "reason": reason}) + "\n").encode())


def read_failures(path: Path, length: int) -> list[tuple[int, str]]:
    """The failures recorded in the first ``length`` bytes of a failed log."""
    if length == 0:
        return []
    with open(path, "rb") as fh:
        data = fh.read(length)
    if len(data) < length:
        raise ResumeError(
            f"{path} is shorter than its checkpoint says; start over with overwrite=True", arguments=("overwrite",)
        )
    out = []
    try:
        for line in data.decode().splitlines():
            record = parse_json(line, str(path))
            index, reason = record["index"], record["reason"]
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(reason, str):
                raise ValueError("a record of the wrong types")
            out.append((index, reason))
    except (ValueError, KeyError, TypeError, MalformedFileError) as exc:  # UnicodeDecodeError is a ValueError
        raise ResumeError(
            f"{path}, the failure log of the unfinished run, is damaged ({exc}); start over with overwrite=True",
            arguments=("overwrite",),
        ) from None
    return out


def truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(length)


def sync_file(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
