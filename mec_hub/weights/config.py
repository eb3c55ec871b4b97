"""One model description, ``ModelConfig``, and the published folder it is read from and written to.

A folder (or Hugging Face repo) holds ``model.safetensors`` (headless backbone, timm keys),
optionally ``projector.safetensors`` (the MEC projector), ``config.json`` and a model card
``README.md``. ``config.json`` is what ``timm.create_model("hf-hub:...")`` and
``"local-dir:..."`` read (``architecture``, ``num_classes: 0``, ``num_features``,
``pretrained_cfg``); our own fields live under the top-level key ``mec_hub``, which timm ignores.
``ModelConfig`` is that file as one frozen dataclass, in the manner of timm's ``PretrainedCfg``:
the registry's records (``mec_hub.weights.record``), ``config.json`` and a loaded model's
``.config`` are all this one type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mec_hub.errors import CheckpointReadError

MODEL_FILE = "model.safetensors"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
# Key of the safetensors header metadata that makes a lone .safetensors file self-describing.
METADATA_KEY = "mec_hub_config"

# ImageNet normalisation: the default of every description, and of training and evaluation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The evaluation preprocessing, in timm's pretrained_cfg vocabulary (create_transform's arguments).
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
# The projector's shape as config.json names it.
PROJECTOR_KEYS = ("in_dim", "hidden_dim", "out_dim")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What is needed to rebuild a model from its weights, how to preprocess its input, and what
    is known about it.

    ``projector`` is the MEC projector's shape ``(in, hidden, out)`` (three layers, the last a
    BatchNorm without affine), ``None`` when none is published. ``files`` maps each weights file
    of the folder to its SHA-256. ``stem="small"`` is the CIFAR-style 3x3/1 ResNet stem without
    max-pool (see ``mec_hub.models.encoder``). ``classifier`` names the classifier modules that a
    timm folder's model file holds beyond the headless backbone (its ``config.json`` says
    ``num_classes > 0``): their keys are left out when the backbone is loaded, as timm leaves them
    out for ``num_classes=0``; our own folders hold none.
    """

    name: str | None = None
    architecture: str
    num_features: int
    model_args: Mapping[str, Any] = field(default_factory=dict)
    stem: str = "default"
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    projector: tuple[int, int, int] | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    classifier: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists from JSON and tuples from code describe the same preprocessing: hold one form.
        for key, value in preprocessing_fields(self.preprocessing).items():
            object.__setattr__(self, key, value)
        if self.projector is not None:
            object.__setattr__(self, "projector", tuple(int(dim) for dim in self.projector))

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing fields (tuples), as ``preprocessing_fields`` normalises any ``pretrained_cfg``."""
        return {key: getattr(self, key) for key in PREPROCESSING_KEYS}

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing as timm's ``pretrained_cfg`` dict, JSON-ready (what a loaded model carries)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in self.preprocessing.items()}

    @property
    def projector_dims(self) -> dict[str, int] | None:
        """The projector's shape in ``config.json``'s words (``in_dim``, ``hidden_dim``, ``out_dim``)."""
        return None if self.projector is None else dict(zip(PROJECTOR_KEYS, self.projector, strict=True))

    def to_json_dict(self) -> dict[str, Any]:
        """``config.json``: timm's fields at the top, ours under ``mec_hub``."""
        pretrained_cfg = self.pretrained_cfg
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
            "projector": self.projector_dims,
            "stem": self.stem,
            "files": dict(self.files),
            "meta": dict(self.meta),
        }
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], *, origin: str) -> ModelConfig:
        if not isinstance(data, Mapping) or "architecture" not in data:
            raise CheckpointReadError(f"{origin}: not a model config (no 'architecture' field)")
        ours = data.get("mec_hub") or {}
        projector = ours.get("projector")
        pretrained_cfg = data.get("pretrained_cfg") or {}
        num_features = data.get("num_features") or pretrained_cfg.get("num_features")
        if not isinstance(num_features, int):
            raise CheckpointReadError(f"{origin}: config has no integer 'num_features'")
        try:
            dims = tuple(projector[key] for key in PROJECTOR_KEYS) if projector else None
        except (KeyError, TypeError):
            raise CheckpointReadError(f"{origin}: 'projector' needs in_dim, hidden_dim and out_dim") from None
        return cls(
            name=ours.get("name"),
            architecture=str(data["architecture"]),
            num_features=num_features,
            model_args=_headless_model_args(data.get("model_args")),
            stem=str(ours.get("stem") or "default"),
            **preprocessing_fields(pretrained_cfg),
            projector=dims,
            files=dict(ours.get("files") or {}),
            meta=dict(ours.get("meta") or {}),
            classifier=_classifier_names(data, pretrained_cfg),
        )


def _classifier_names(data: Mapping[str, Any], pretrained_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The classifier modules a timm config with ``num_classes > 0`` has weights for (timm's ``classifier``)."""
    if not data.get("num_classes"):
        return ()
    names = pretrained_cfg.get("classifier") or "fc"
    return (names,) if isinstance(names, str) else tuple(str(name) for name in names)


# What timm's ``save_for_hf`` records of every model it saves: the backbone is always built
# headless (``num_classes=0``), and the other two at these values are timm's defaults.
_TIMM_RECORDED_ARGS = {"in_chans": 3, "global_pool": "avg"}


def _headless_model_args(model_args: Any) -> dict[str, Any]:
    """The builder arguments of a config, less ``num_classes`` and timm's recorded defaults."""
    return {
        key: value
        for key, value in dict(model_args or {}).items()
        if key != "num_classes" and not (key in _TIMM_RECORDED_ARGS and _TIMM_RECORDED_ARGS[key] == value)
    }


def preprocessing_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing fields of a timm ``pretrained_cfg`` (missing ones at ``ModelConfig``'s
    defaults), normalised so that two that preprocess alike compare equal."""

    def get(key: str) -> Any:
        return cfg.get(key, getattr(ModelConfig, key))  # a dataclass field's class attribute is its default

    return {
        "input_size": tuple(get("input_size")),
        "interpolation": str(get("interpolation")),
        "crop_pct": float(get("crop_pct")),
        "crop_mode": str(get("crop_mode")),
        "mean": tuple(get("mean")),
        "std": tuple(get("std")),
    }


def read_config(path: str | Path) -> ModelConfig:
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
    return ModelConfig.from_json_dict(data, origin=str(path))


def config_from_safetensors_metadata(metadata: Mapping[str, str] | None, *, origin: str) -> ModelConfig | None:
    """The config embedded in a safetensors header by our converter, if there is one."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointReadError(f"{origin}: malformed {METADATA_KEY} metadata ({exc})") from None
    return ModelConfig.from_json_dict(data, origin=origin)
