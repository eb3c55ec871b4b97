"""``ModelIdentity``: the one description of a loaded model that everything downstream records.

Which weights (their registry name, where they were loaded from, their SHA-256), which output
(architecture, head, dimension, pooled stage, runtime) and which preprocessing. A model makes it
once (``MECEncoder.identity``, ``PooledStage.identity``, ``OnnxRuntimeModel.identity``); the
embedder adds where the weights came from; the feature-set meta, the run's fingerprint, the index
record and the query model of ``search``/``serve`` all take it from there, as ``to_json()``,
and compare against it with ``differences``. The JSON keys are those of ``FEATS.meta.json``, so a
meta file reads back as an identity (``from_json``) without a translation table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mec_hub.errors import InvalidArgumentError, MalformedFileError
from mec_hub.fileio import json_plain
from mec_hub.weights.config import preprocessing_fields
from mec_hub.weights.sources import parse_weights_spec

# The keys of an identity in a JSON record, in the order they are written.
IDENTITY_KEYS = (
    "model",
    "weights",
    "weights_sha256",
    "state_dict_sha256",
    "architecture",
    "head",
    "embed_dim",
    "preprocessing",
    "pooling",
    "runtime",
)
# Written only when set: absent from the records of the model's own output run by torch.
_OPTIONAL_KEYS = ("state_dict_sha256", "pooling", "runtime")


@dataclass(frozen=True)
class ModelIdentity:
    """What a model is, as far as its outputs are concerned (see the module docstring)."""

    architecture: str
    head: str
    embed_dim: int
    preprocessing: Mapping[str, Any]
    weights_sha256: str | None = None  # of the weights file; None for weights not read from one
    state_dict_sha256: str | None = None  # of the tensors, for weights without a file digest
    model: str | None = None  # the registry name, when it has one
    weights: str | None = None  # where the weights were loaded from (a path made absolute, hf-hub:..., a URL)
    pooling: Mapping[str, Any] | None = None  # a backbone stage pooled (mec_hub.models.features.PooledStage)
    runtime: str | None = None  # another runtime than torch ("onnxruntime")

    def replace(self, **changes: Any) -> ModelIdentity:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The identity as the JSON object records hold (``FEATS.meta.json``'s model fields)."""
        out: dict[str, Any] = {}
        for key in IDENTITY_KEYS:
            value = getattr(self, key)
            if key in _OPTIONAL_KEYS and value is None:
                continue
            out[key] = json_plain(value)  # lists, not tuples: a record read back compares equal
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, origin: str = "record") -> ModelIdentity:
        """The identity in a record written by ``to_json`` (or a whole ``FEATS.meta.json``)."""
        missing = [key for key in ("architecture", "head", "embed_dim", "preprocessing") if data.get(key) is None]
        if missing:
            raise MalformedFileError(f"{origin}: no model {', '.join(missing)} recorded")
        checks = {
            "architecture": str, "head": str, "embed_dim": int, "preprocessing": Mapping, "weights_sha256": str,
            "state_dict_sha256": str, "model": str, "weights": str, "pooling": Mapping, "runtime": str,
        }  # fmt: skip
        values: dict[str, Any] = {}
        for key, kind in checks.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise MalformedFileError(f"{origin}: {key} is {value!r}, expected {kind.__name__}")
            values[key] = dict(value) if isinstance(value, Mapping) else value
        return cls(**values)

    def differences(self, recorded: ModelIdentity) -> list[str]:
        """What makes this model's outputs differ from those of ``recorded`` (empty: the same model).

        The weights are compared by file digest when both have one, else by tensor digest when
        ``recorded`` has one; where the weights came from (``model``, ``weights``) does not matter.
        """
        problems = []
        if recorded.weights_sha256 and self.weights_sha256:
            if recorded.weights_sha256 != self.weights_sha256:
                problems.append(
                    f"weights SHA-256 {self.weights_sha256[:12]}... instead of {recorded.weights_sha256[:12]}..."
                )
        elif recorded.state_dict_sha256 and recorded.state_dict_sha256 != self.state_dict_sha256:
            problems.append("different weights (state_dict digest)")
        for key in ("head", "embed_dim", "pooling", "runtime"):
            want, have = getattr(recorded, key), getattr(self, key)
            if want != have:
                problems.append(f"{key} {have!r} instead of {want!r}")
        if _resolved(recorded.preprocessing) != _resolved(self.preprocessing):
            problems.append(f"preprocessing {dict(self.preprocessing)} instead of {dict(recorded.preprocessing)}")
        return problems


def _resolved(preprocessing: Mapping[str, Any]) -> dict[str, Any] | str:
    """Preprocessing in one form (missing keys at their defaults), so that equal means "preprocesses alike"."""
    try:
        return preprocessing_fields(preprocessing)
    except InvalidArgumentError as exc:
        return f"invalid: {exc}"


def weights_origin(weights: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    """(registry name, loadable weights string) of a weights spec, for ``ModelIdentity.model`` and
    ``.weights``: a registry name is a name; a local path is made absolute, so the record loads
    from anywhere; anything else (``hf-hub:``, a URL) is kept as written; ``"DEFAULT"`` (the
    model's own weights) says no more than ``None``."""
    if weights is None:
        return None, None
    spec = parse_weights_spec(weights)
    if spec.kind == "default":
        return None, None
    if spec.kind == "registry":
        return spec.value, None
    if spec.kind in ("file", "folder"):
        return None, str(Path(spec.value).resolve())
    return None, str(spec)
