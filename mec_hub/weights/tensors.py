"""The one reader of ``.safetensors`` files (``model.safetensors``, ``projector.safetensors``).

The parsing is safetensors' own (it checks the header's length and every tensor's offsets against
the file before anything is mapped); what this module adds is the file-kind check (a FIFO or a
device would block or stream forever) and one ``CheckpointReadError`` naming the file and the
weights spec it came from, whatever safetensors raises.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mec_hub.errors import CheckpointReadError


def _regular(path: str | os.PathLike[str], *, origin: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointReadError(f"{origin}: cannot read {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointReadError(f"{origin}: {path} is not a regular file")
    return str(path)


def _unreadable(path: str | os.PathLike[str], origin: str, exc: Exception) -> CheckpointReadError:
    return CheckpointReadError(f"{origin}: cannot read {Path(path)} as safetensors, corrupted or truncated ({exc})")


def read_safetensors(path: str | os.PathLike[str], *, origin: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, on the CPU."""
    name = _regular(path, origin=origin)
    try:
        return load_file(name, device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ... for bad files
        raise _unreadable(path, origin, exc) from None


def read_safetensors_metadata(path: str | os.PathLike[str], *, origin: str) -> dict[str, str] | None:
    """The header's ``__metadata__`` (no tensor is read)."""
    name = _regular(path, origin=origin)
    try:
        with safe_open(name, framework="pt") as fh:
            return fh.metadata()
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _unreadable(path, origin, exc) from None
