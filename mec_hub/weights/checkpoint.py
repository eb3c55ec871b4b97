"""PyTorch checkpoints as data: the one safe reader, and the training checkpoint's format tag.

``read_checkpoint`` reads any ``torch.save`` file with ``torch.load(weights_only=True)`` (tensors,
dicts, lists, numbers, strings: no arbitrary pickles) and turns every failure into one
``CheckpointReadError`` naming the file, saying when a pickle was refused because it would import
something a tensor checkpoint never holds. ``TRAIN_FORMAT`` is the ``format`` of the checkpoints
``training/pretrain.py`` writes (``training/checkpoint.py``); ``mec_hub.export.convert`` reads
their weights (``extract_weights``).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mec_hub.errors import CheckpointReadError
from mec_hub.fileio import NotRegularFileError, open_regular_file

#: ``checkpoint["format"]`` of a training checkpoint (``training/pretrain.py``).
TRAIN_FORMAT = "mec-hub-train/1"


def read_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file."""
    path = Path(path)
    try:
        fh = open_regular_file(path)
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no such checkpoint file") from None
    except NotRegularFileError as exc:
        raise CheckpointReadError(f"{path}: {exc}, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointReadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        with fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise CheckpointReadError(f"{path}: the file is empty")
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except CheckpointReadError:
        raise
    except Exception as exc:  # garbage bytes make the unpickler fail in many ways (IndexError, KeyError, ...)
        foreign = _foreign_globals(path) if isinstance(exc, pickle.UnpicklingError) else []
        if foreign:
            raise CheckpointReadError(
                f"{path}: refused as unsafe: unpickling it would import {', '.join(foreign[:3])}, which a tensor "
                f"checkpoint never holds and which could run code. mec-hub reads checkpoints with "
                f"torch.load(weights_only=True), tensors only; re-save just the state_dict where the file is trusted"
            ) from None
        raise CheckpointReadError(
            f"{path}: not a readable PyTorch checkpoint, corrupted or truncated ({_unpickler_detail(exc)})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


# Globals of a tensor checkpoint (torch's rebuild functions and storages, OrderedDict, ...): anything
# else a pickle imports is what made torch.load(weights_only=True) refuse it.
_CHECKPOINT_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.bytearray")


def _foreign_globals(path: Path) -> list[str]:
    """The globals the pickle(s) in ``path`` would import beyond a tensor checkpoint's, found by
    reading the opcodes (``pickletools``): nothing is unpickled, nothing runs."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [io.BytesIO(archive.read(n)) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            streams = [io.BytesIO(path.read_bytes())]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    for stream in streams:
        end = len(stream.getbuffer())
        while stream.tell() < end:  # a legacy torch file is several pickles in a row, then raw storages
            strings: list[str] = []
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # raw storage bytes or garbage: no more pickles to read
                break
    return [name for name in dict.fromkeys(found) if not name.startswith(_CHECKPOINT_GLOBALS)]


def _unpickler_detail(exc: Exception) -> str:
    """torch's reason for a failed load, without its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and "weights_only" not in line and "pytorch.org" not in line]
    detail = kept[0] if kept else type(exc).__name__
    return detail.removeprefix("WeightsUnpickler error:").strip() or type(exc).__name__
