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

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mec_hub.errors import CheckpointReadError, InvalidArgumentError, MalformedFileError
from mec_hub.fileio import parse_json, read_json

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
# ResNet stems: timm's own, or the CIFAR-style 3x3/1 one without max-pool (mec_hub.models.encoder).
STEMS = ("default", "small")


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
        """The description in ``config.json`` (or a safetensors header), taking only what is safe to act on.

        A config is what a file says about itself, and anyone may have written it; what it says
        steers timm. So the architecture must be one of timm's ResNet family, ``model_args`` only
        the architecture arguments of ``MODEL_ARGS`` and every number a sane one: anything else is
        a ``CheckpointReadError`` naming ``origin`` and the field. This is the one place that
        decides what a file may ask for (``check_build_args`` applies the same rules to a checkpoint).
        """
        if not isinstance(data, Mapping) or "architecture" not in data:
            raise CheckpointReadError(f"{origin}: not a model config (no 'architecture' field)")
        try:
            ours = _mapping(data.get("mec_hub"), "mec_hub")
            for key in ours:
                if key not in MEC_HUB_KEYS:
                    raise _FieldError(f"mec_hub.{key}", f"is not a field of this format ({', '.join(MEC_HUB_KEYS)})")
            version = _int(ours.get("format_version", FORMAT_VERSION), "mec_hub.format_version", 1, 1 << 30)
            if version > FORMAT_VERSION:
                raise _FieldError(
                    "mec_hub.format_version",
                    f"is {version}: written by a newer mec-hub (this one reads {FORMAT_VERSION}); upgrade mec-hub",
                )
            pretrained_cfg = _mapping(data.get("pretrained_cfg"), "pretrained_cfg")
            num_features = data.get("num_features") or pretrained_cfg.get("num_features")
            if num_features is None:
                raise _FieldError("num_features", "is missing")
            projector = ours.get("projector")
            classifier = pretrained_cfg.get("classifier")
            if not (classifier is None or isinstance(classifier, str) or _is_str_list(classifier)):
                raise _FieldError(
                    "pretrained_cfg.classifier", f"must be a module name or a list of them, not {_show(classifier)}"
                )
            config = cls(
                name=_optional_str(ours.get("name"), "mec_hub.name"),
                architecture=_architecture(data["architecture"], "architecture"),
                num_features=_int(num_features, "num_features", 1, MAX_DIM),
                model_args=_model_args(_headless_model_args(_mapping(data.get("model_args"), "model_args"))),
                stem=_choice(ours.get("stem") or "default", "mec_hub.stem", STEMS),
                **_preprocessing(pretrained_cfg, "pretrained_cfg."),
                projector=None if projector is None else _projector(projector),
                files=_files(ours.get("files")),
                meta=_mapping(ours.get("meta"), "mec_hub.meta"),
                classifier=_classifier_names(data, pretrained_cfg),
            )
        except _FieldError as exc:
            raise CheckpointReadError(f"{origin}: {exc}") from None
        return config


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
    defaults), normalised so that two that preprocess alike compare equal.

    Every route to timm's ``create_transform`` passes here, so values outside ``_preprocessing``'s
    bounds (a 100000-pixel input, an unknown interpolation) are an ``InvalidArgumentError``.
    """
    if not isinstance(cfg, Mapping):
        raise InvalidArgumentError(f"preprocessing must be a mapping (timm's pretrained_cfg), not {type(cfg).__name__}")
    try:
        return _preprocessing(cfg, "pretrained_cfg.")
    except _FieldError as exc:
        raise InvalidArgumentError(f"preprocessing: {exc}") from None


# -- what a config file may say -------------------------------------------------------------------
# Largest feature or projector width accepted from a file (timm's ResNet family tops out at 2048).
MAX_DIM = 16384
# Input sides accepted, and the largest side an image is resized to before the crop (side / crop_pct).
MIN_SIDE, MAX_SIDE, MAX_RESIZE = 8, 2048, 4096
# timm's names for the eval resize (timm.data.transforms.str_to_interp_mode) and for the crop.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
MEC_HUB_KEYS = ("format_version", "name", "projector", "stem", "files", "meta")
# The timm module whose models a config may name, and how a name may look (no "hf-hub:" or
# "local-dir:" prefix, which would make timm fetch or read another config).
ARCHITECTURE_MODULE = "resnet"
_ARCHITECTURE_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _FieldError(Exception):
    """One field of a config that is not acceptable: ``field`` (dotted) and what is wrong with it."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"field '{field_name}' {problem}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _FieldError(name, f"must be a JSON object, not {type(value).__name__} {_show(value)}")
    return dict(value)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _FieldError(name, f"must be an integer from {low} to {high}, not {_show(value)}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _FieldError(name, f"must be a finite number, not {_show(value)}")
    return float(value)


def _choice(value: Any, name: str, choices: tuple[Any, ...]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise _FieldError(name, f"must be one of {', '.join(map(repr, choices))}, not {_show(value)}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(name, f"must be true or false, not {_show(value)}")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _FieldError(name, f"must be a string, not {_show(value)}")
    return value


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _int_list(low: int, high: int) -> Callable[[Any, str], list[int]]:
    def check(value: Any, name: str) -> list[int]:
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= 4:
            raise _FieldError(name, f"must be a list of 1 to 4 integers, not {_show(value)}")
        for i, item in enumerate(value):
            _int(item, f"{name}[{i}]", low, high)
        return value  # as given, so that the file writes back unchanged

    return check


# The arguments of timm's ResNet (timm.models.resnet.ResNet) that shape the architecture, with the
# values a file may give them. Nothing else reaches timm.create_model from a file: not
# checkpoint_path (a pickle timm would torch.load), not pretrained_cfg_overlay, not a layer class.
MODEL_ARGS: dict[str, Callable[[Any, str], Any]] = {
    "layers": _int_list(1, 64),
    "channels": _int_list(1, 4096),
    "stem_width": lambda v, n: _int(v, n, 1, 1024),
    "stem_type": lambda v, n: _choice(v, n, ("", "deep", "deep_tiered")),
    "cardinality": lambda v, n: _int(v, n, 1, 256),
    "base_width": lambda v, n: _int(v, n, 1, 1024),
    "replace_stem_pool": _bool,
    "block_reduce_first": lambda v, n: _int(v, n, 1, 4),
    "down_kernel_size": lambda v, n: _choice(v, n, (1, 3)),
    "avg_down": _bool,
}


def _model_args(args: dict[str, Any]) -> dict[str, Any]:
    for key, value in args.items():
        check = MODEL_ARGS.get(key)
        if check is None:
            raise _FieldError(
                f"model_args.{key}", f"is not an architecture argument mec-hub accepts ({', '.join(MODEL_ARGS)})"
            )
        check(value, f"model_args.{key}")
    return args


def _architecture(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ARCHITECTURE_NAME.fullmatch(value):
        raise _FieldError(name, f"must be a timm model name such as 'resnet50', not {_show(value)}")
    from timm.models import is_model_in_modules  # imported here: reading a config needs no torch otherwise

    if not is_model_in_modules(value, [ARCHITECTURE_MODULE]):
        raise _FieldError(
            name, f"is {value!r}, which is not one of timm's ResNet-family models (timm.list_models(module='resnet'))"
        )
    return value


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise _FieldError(name, f"must be 3 numbers (one per RGB channel), not {_show(value)}")
    return tuple(_number(v, name) for v in value)  # type: ignore[return-value]


def _preprocessing(cfg: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The six preprocessing fields of ``cfg``, each within bounds (missing ones at ModelConfig's defaults)."""

    def get(key: str) -> Any:
        return cfg.get(key, getattr(ModelConfig, key))  # a dataclass field's class attribute is its default

    size = get("input_size")
    if not isinstance(size, list | tuple) or len(size) != 3:
        raise _FieldError(f"{prefix}input_size", f"must be [3, height, width], not {_show(size)}")
    _choice(size[0], f"{prefix}input_size", (3,))
    for side in size[1:]:
        _int(side, f"{prefix}input_size", MIN_SIDE, MAX_SIDE)
    crop_pct = _number(get("crop_pct"), f"{prefix}crop_pct")
    if not 0 < crop_pct <= 1.5 or max(size[1:]) / crop_pct > MAX_RESIZE:
        raise _FieldError(
            f"{prefix}crop_pct",
            f"must be in (0, 1.5] and resize to at most {MAX_RESIZE} px (side / crop_pct), not {_show(crop_pct)}",
        )
    std = _triple(get("std"), f"{prefix}std")
    if min(std) <= 0:
        raise _FieldError(f"{prefix}std", f"must be 3 positive numbers, not {_show(list(std))}")
    return {
        "input_size": tuple(size),
        "interpolation": _choice(get("interpolation"), f"{prefix}interpolation", INTERPOLATIONS),
        "crop_pct": crop_pct,
        "crop_mode": _choice(get("crop_mode"), f"{prefix}crop_mode", CROP_MODES),
        "mean": _triple(get("mean"), f"{prefix}mean"),
        "std": std,
    }


def _projector(value: Any) -> tuple[int, int, int]:
    dims = _mapping(value, "mec_hub.projector")
    for key in dims:
        if key not in PROJECTOR_KEYS:
            raise _FieldError(f"mec_hub.projector.{key}", f"is not one of {', '.join(PROJECTOR_KEYS)}")
    for key in PROJECTOR_KEYS:
        if key not in dims:
            raise _FieldError(f"mec_hub.projector.{key}", "is missing")
    return tuple(_int(dims[key], f"mec_hub.projector.{key}", 1, MAX_DIM) for key in PROJECTOR_KEYS)  # type: ignore[return-value]


def _files(value: Any) -> dict[str, str]:
    files = _mapping(value, "mec_hub.files")
    for key, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _FieldError(
                f"mec_hub.files.{key}", f"must be a SHA-256 (64 hex digits, lower case), not {_show(digest)}"
            )
    return files


def check_build_args(architecture: Any, model_args: Any, stem: Any, preprocessing: Any = None, *, origin: str) -> None:
    """The rules of ``ModelConfig.from_json_dict`` for descriptions that come from elsewhere than
    ``config.json`` (a checkpoint's ``arch``, ``model_args``, ``stem`` and preprocessing): a
    ``CheckpointReadError`` naming ``origin`` and the field."""
    try:
        _architecture(architecture, "arch")
        _model_args(_mapping(model_args, "model_args"))
        _choice(stem, "stem", STEMS)
        _preprocessing(_mapping(preprocessing, "preprocessing"), "preprocessing.")
    except _FieldError as exc:
        raise CheckpointReadError(f"{origin}: {exc}") from None


def read_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no {CONFIG_FILE} here") from None
    except MalformedFileError as exc:
        raise CheckpointReadError(f"unreadable config: {exc}") from None
    return ModelConfig.from_json_dict(data, origin=str(path))


def config_from_safetensors_metadata(metadata: Mapping[str, str] | None, *, origin: str) -> ModelConfig | None:
    """The config embedded in a safetensors header by our converter, if there is one."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        data = parse_json(metadata[METADATA_KEY], f"{origin} ({METADATA_KEY} metadata)")
    except MalformedFileError as exc:
        raise CheckpointReadError(str(exc)) from None
    return ModelConfig.from_json_dict(data, origin=origin)
