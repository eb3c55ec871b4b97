"""The published folder format: ``config.json`` in timm's layout beside safetensors files.

A folder (or Hugging Face repo) holds ``model.safetensors`` (headless backbone, timm keys),
optionally ``projector.safetensors`` (the MEC projector), ``config.json`` and a model card
``README.md``. ``config.json`` is what ``timm.create_model("hf-hub:...")`` and
``"local-dir:..."`` read (``architecture``, ``num_classes: 0``, ``num_features``,
``pretrained_cfg``); our own fields live under the top-level key ``mec_hub``, which timm ignores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mec_hub.errors import CheckpointReadError
from mec_hub.weights.registry import ModelRecord, Preprocessing, ProjectorSpec

MODEL_FILE = "model.safetensors"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
# Key of the safetensors header metadata that makes a lone .safetensors file self-describing.
METADATA_KEY = "mec_hub_config"


@dataclass(frozen=True)
class HubConfig:
    """What is needed to rebuild a model from its weights, and what is known about them."""

    architecture: str
    num_features: int
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model_args: Mapping[str, Any] = field(default_factory=dict)
    projector: ProjectorSpec | None = None
    stem: str = "default"
    name: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: ModelRecord) -> HubConfig:
        files = {MODEL_FILE: record.sha256} if record.sha256 else {}
        if record.projector_sha256:
            files[PROJECTOR_FILE] = record.projector_sha256
        return cls(
            architecture=record.architecture,
            num_features=record.embed_dim,
            preprocessing=record.preprocessing,
            model_args=dict(record.model_args),
            projector=record.projector,
            stem=record.stem,
            name=record.name,
            files=files,
            meta=dict(record.meta),
        )

    def with_files(self, files: Mapping[str, str]) -> HubConfig:
        return replace(self, files=dict(files))

    def to_json_dict(self) -> dict[str, Any]:
        pretrained_cfg = self.preprocessing.to_pretrained_cfg()
        pretrained_cfg.update(num_classes=0, first_conv="conv1", classifier="fc")
        if self.meta.get("license"):
            pretrained_cfg["license"] = self.meta["license"]
        if self.meta.get("paper"):
            pretrained_cfg["paper_name"] = self.meta["paper"]
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "num_classes": 0,
            "num_features": self.num_features,
            "global_pool": "avg",
        }
        if self.model_args:
            out["model_args"] = dict(self.model_args)
        out["pretrained_cfg"] = pretrained_cfg
        out["mec_hub"] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "projector": None if self.projector is None else vars(self.projector).copy(),
            "stem": self.stem,
            "files": dict(self.files),
            "meta": dict(self.meta),
        }
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], *, origin: str) -> HubConfig:
        if not isinstance(data, Mapping) or "architecture" not in data:
            raise CheckpointReadError(f"{origin}: not a model config (no 'architecture' field)")
        ours = data.get("mec_hub") or {}
        projector = ours.get("projector")
        pretrained_cfg = data.get("pretrained_cfg") or {}
        num_features = data.get("num_features") or pretrained_cfg.get("num_features")
        if not isinstance(num_features, int):
            raise CheckpointReadError(f"{origin}: config has no integer 'num_features'")
        return cls(
            architecture=str(data["architecture"]),
            num_features=num_features,
            preprocessing=Preprocessing.from_pretrained_cfg(pretrained_cfg),
            model_args=dict(data.get("model_args") or {}),
            projector=ProjectorSpec(**projector) if projector else None,
            stem=str(ours.get("stem") or "default"),
            name=ours.get("name"),
            files=dict(ours.get("files") or {}),
            meta=dict(ours.get("meta") or {}),
        )

    @property
    def embed_dim(self) -> int:
        return self.num_features


def read_config(path: str | Path) -> HubConfig:
    """Read ``config.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no {CONFIG_FILE} here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointReadError(f"{path}: unreadable config ({exc})") from None
    return HubConfig.from_json_dict(data, origin=str(path))


def config_from_safetensors_metadata(metadata: Mapping[str, str] | None, *, origin: str) -> HubConfig | None:
    """The config embedded in a safetensors header by our converter, if there is one."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointReadError(f"{origin}: malformed {METADATA_KEY} metadata ({exc})") from None
    return HubConfig.from_json_dict(data, origin=origin)
