"""The ``FILE.json`` written beside an exported model ``FILE`` (ONNX, torch.export or TorchScript): its one home.

It is the model's ``config.json`` (``ModelConfig.to_json_dict``: ``pretrained_cfg`` is the
preprocessing, in timm's vocabulary) with an ``export`` section: the format, the file's name and
SHA-256, the head and embedding dimension, the input and output tensors' names and shapes, the
ONNX opset, the digest of the weights it was exported from, how closely it reproduced PyTorch, and
the versions that wrote it. ``mec_hub.export.deploy`` writes it (``write_export_description``);
a runtime that runs the file (``mec_hub.models.onnx_runtime``) reads it (``read_export_description``).

From ``export.version`` 2 on, ``export.preprocessing`` spells the preprocessing out as explicit
steps (resize rule, centre crop, scaling, mean and std, channel order, layout:
``mec_hub.data.transforms.preprocessing_rule``), for a re-implementation in another language.
A sidecar without ``version`` is version 1, without that section; both read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mec_hub.errors import MalformedFileError, MecHubError
from mec_hub.fileio import atomic_write_json, read_json
from mec_hub.models.head_names import DEFAULT_HEAD, HEADS
from mec_hub.weights.config import ModelConfig
from mec_hub.weights.identity import ModelIdentity

#: ``pt2``: a ``torch.export`` program (``torch.export.load``); ``torchscript`` is deprecated by PyTorch.
EXPORT_FORMATS = ("onnx", "pt2", "torchscript")
#: Version of the ``export`` section: 2 added ``preprocessing``.
SIDECAR_VERSION = 2
#: The names of the exported graph's input (normalised images) and output (the embedding).
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
INPUT_IS = "float32 RGB, resized and cropped to input_size, scaled to [0, 1], normalised by mean and std"
#: A description is a config.json and a few fields: kilobytes. Anything far larger is refused unread.
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
#: Widest embedding a description may claim (the widest MEC projector is 8192).
MAX_EMBED_DIM = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The steps ``export.preprocessing`` holds, each a mapping of explicit fields.
PREPROCESSING_STEPS = ("resize", "crop", "to_float", "normalize")


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``FILE`` -> ``FILE.json``, where the preprocessing and export details of ``FILE`` are written."""
    return Path(f"{os.fspath(path)}.json")


@dataclass(frozen=True)
class ExportDescription:
    """``FILE.json`` as read back: the model's description and the fields of ``export`` a runtime acts on."""

    path: Path  # the FILE.json read
    config: ModelConfig
    format: str
    sha256: str
    head: str
    embed_dim: int
    export: Mapping[str, Any]  # the whole export section, as written
    version: int = 1
    preprocessing: Mapping[str, Any] | None = None  # the explicit steps (version 2 on)


def write_export_description(
    path: str | os.PathLike[str],
    config: ModelConfig,
    *,
    fmt: str,
    sha256: str,
    source: ModelIdentity,
    input_size: tuple[int, int, int],
    any_batch: bool,
    opset: int | None,
    max_rel_diff: float | None,
    versions: Mapping[str, str],
    preprocessing: Mapping[str, Any],
) -> Path:
    """Write ``FILE.json`` for the exported ``path`` (atomically); return its path.

    ``source`` is the identity of the model exported: its head, dimension and weights digest are recorded.
    ``preprocessing``: the explicit steps (``mec_hub.data.transforms.preprocessing_rule`` of ``config``).
    """
    head, embed_dim, source_weights_sha256 = source.head, source.embed_dim, source.weights_sha256
    batch: int | str = "N" if any_batch else 1
    description = config.to_json_dict()
    description["export"] = {
        "version": SIDECAR_VERSION,
        "format": fmt,
        "file": Path(path).name,
        "sha256": sha256,
        "head": head,
        "embed_dim": int(embed_dim),
        "input": {"name": INPUT_NAME, "shape": [batch, *(int(n) for n in input_size)]},
        "output": {"name": OUTPUT_NAME, "shape": [batch, int(embed_dim)]},
        "input_is": INPUT_IS,
        "preprocessing": dict(preprocessing),
        "opset": opset,
        "source_weights_sha256": source_weights_sha256,
        "max_rel_diff_vs_pytorch": max_rel_diff,
        **dict(versions),
    }
    return atomic_write_json(sidecar_path(path), description)


def read_export_description(path: str | os.PathLike[str]) -> ExportDescription:
    """``FILE.json`` of the exported ``path``, checked: every field a runtime acts on is there and sane.

    A missing file, unreadable JSON or a bad field is one ``MecHubError`` naming the file (and field).
    """
    side = sidecar_path(path)
    try:
        data = read_json(side, max_bytes=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        raise MecHubError(
            f"{side} not found: the preprocessing of an exported model is read from it (mec-hub export writes it)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("export"), dict):
        raise MalformedFileError(f"{side}: no 'export' section; write it with mec-hub export")
    export = data["export"]
    fmt = export.get("format")
    if fmt not in EXPORT_FORMATS:
        raise MalformedFileError(f"{side}: export.format is {fmt!r}, not one of {EXPORT_FORMATS}")
    sha256 = export.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise MalformedFileError(f"{side}: export.sha256 is {sha256!r}, not a SHA-256 (64 lowercase hex digits)")
    head = export.get("head", DEFAULT_HEAD)
    if head not in HEADS:
        raise MalformedFileError(f"{side}: export.head is {head!r}, not one of {HEADS}")
    dim = export.get("embed_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= MAX_EMBED_DIM:
        raise MalformedFileError(f"{side}: export.embed_dim is {dim!r}, not a dimension (1..{MAX_EMBED_DIM})")
    version = export.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedFileError(f"{side}: export.version is {version!r}, not a version (1, 2, ...)")
    preprocessing = export.get("preprocessing")
    if preprocessing is not None and not (
        isinstance(preprocessing, dict) and all(isinstance(preprocessing.get(k), dict) for k in PREPROCESSING_STEPS)
    ):
        raise MalformedFileError(
            f"{side}: export.preprocessing is not a mapping with the steps {', '.join(PREPROCESSING_STEPS)}"
        )
    config = ModelConfig.from_json_dict(data, origin=str(side))
    return ExportDescription(side, config, fmt, sha256, head, dim, export, version, preprocessing)


def write_derived_description(
    path: str | os.PathLike[str], source: ExportDescription, *, sha256: str, changes: Mapping[str, Any]
) -> Path:
    """Write ``FILE.json`` for ``path``, a file made from the export ``source`` describes (e.g. its int8
    quantization): the same description, with the file's name and SHA-256 and ``changes`` in ``export``."""
    description = source.config.to_json_dict()
    description["export"] = {**dict(source.export), "file": Path(path).name, "sha256": sha256, **dict(changes)}
    return atomic_write_json(sidecar_path(path), description)
