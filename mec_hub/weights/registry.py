"""Published models as declarative records, and the registry that lists them.

A record says everything about one set of weights: the timm architecture, where the
safetensors files live (bundled in the package, a Hugging Face repo pinned to a revision, an
https URL), their SHA-256, the preprocessing they were trained with, and the numbers a user
compares. The code that loads a record is generic (``mec_hub.models.loading``); adding a model is adding
a record to ``mec_hub.weights.zoo``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mec_hub.errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing, in timm's ``pretrained_cfg`` vocabulary."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_pretrained_cfg(self) -> dict[str, Any]:
        cfg = asdict(self)
        cfg["input_size"] = list(self.input_size)
        cfg["mean"], cfg["std"] = list(self.mean), list(self.std)
        return cfg

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> Preprocessing:
        default = cls()
        return cls(
            input_size=tuple(cfg.get("input_size", default.input_size)),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", default.interpolation)),
            crop_pct=float(cfg.get("crop_pct", default.crop_pct)),
            crop_mode=str(cfg.get("crop_mode", default.crop_mode)),
            mean=tuple(cfg.get("mean", default.mean)),
            std=tuple(cfg.get("std", default.std)),
        )


@dataclass(frozen=True)
class ProjectorSpec:
    """Shape of the MEC projector (3 layers, the last a BatchNorm without affine)."""

    in_dim: int
    hidden_dim: int
    out_dim: int


@dataclass(frozen=True)
class ModelRecord:
    """One published MEC model.

    ``sha256`` is the digest of ``model.safetensors`` (the headless backbone) and
    ``projector_sha256`` that of ``projector.safetensors``; ``None`` means not yet known, and
    loading then warns loudly that the file is unverified.
    """

    name: str
    architecture: str
    embed_dim: int
    preprocessing: Preprocessing
    sha256: str | None = None
    hf_repo_id: str | None = None
    hf_revision: str | None = None
    url: str | None = None
    bundled: str | None = None
    projector: ProjectorSpec | None = None
    projector_sha256: str | None = None
    # "small": CIFAR-style 3x3/1 ResNet stem without max-pool (see mec_hub.models.encoder).
    stem: str = "default"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source_env_var(self) -> str:
        """Environment variable that overrides where this model's weights are fetched from."""
        return f"MEC_HUB_{self.name.upper()}_WEIGHTS"

    def source_override(self) -> str | None:
        return os.environ.get(self.source_env_var) or None

    def locations(self) -> list[str]:
        """Where the weights can come from, most preferred first, as ``mec_hub.load`` specs."""
        found = []
        override = self.source_override()
        if override:
            return [override]
        if self.bundled:
            found.append(f"bundled:{self.bundled}")
        if self.hf_repo_id:
            rev = f"@{self.hf_revision}" if self.hf_revision else ""
            found.append(f"hf-hub:{self.hf_repo_id}{rev}")
        if self.url:
            found.append(self.url)
        return found

    def to_dict(self) -> dict[str, Any]:
        info = asdict(self)
        info["preprocessing"] = self.preprocessing.to_pretrained_cfg()
        info["model_args"] = dict(self.model_args)
        info["meta"] = dict(self.meta)
        info["source_env_var"] = self.source_env_var
        info["locations"] = self.locations()
        return info


_REGISTRY: dict[str, ModelRecord] = {}


def register(record: ModelRecord) -> ModelRecord:
    if record.name in _REGISTRY:
        raise ValueError(f"model {record.name!r} is registered twice")
    _REGISTRY[record.name] = record
    return record


def _ensure_loaded() -> None:
    if not _REGISTRY:
        import mec_hub.weights.zoo  # noqa: F401  (registers the published records)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the published models, sorted; ``pattern`` is a shell-style filter like ``"*resnet*"``."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_info(name: str) -> ModelRecord:
    """The record of a published model; an unknown name raises with the closest names suggested."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(unknown_model_message(name)) from None


def is_registered(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))} (see `mec-hub list`)."
