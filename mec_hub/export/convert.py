"""Convert MEC checkpoints into the published folder format.

Three layouts are read, always with ``torch.load(weights_only=True)`` (no arbitrary pickles;
``mec_hub.weights.checkpoint.read_checkpoint``):

* the authors' checkpoint: ``{"epoch", "arch", "state_dict", "optimizer"}`` whose state dict
  holds ``module.encoder.*`` (torchvision ResNet, ``fc`` = the 3-layer projector),
  ``module.predictor.*`` and ``module.teacher.*`` (EMA copy of the encoder);
* checkpoints written by ``training/pretrain.py`` (``format``: ``mec_hub.weights.checkpoint.TRAIN_FORMAT``);
* a plain backbone state dict (timm/torchvision keys; a classifier ``fc`` is dropped).

The output folder holds ``model.safetensors`` (headless backbone, timm keys, no ``fc``),
``projector.safetensors`` when the source has a projector, ``config.json`` (timm format) and a
model card ``README.md``. It loads with ``timm.create_model("local-dir:DIR", pretrained=True)``
and with ``mec_hub.load(weights=DIR)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mec_hub.errors import CheckpointReadError, IncompatibleWeightsError
from mec_hub.export.modelcard import render_model_card
from mec_hub.export.outputs import check_output, output_path
from mec_hub.fileio import atomic_directory
from mec_hub.models.encoder import build_backbone, load_state_dict_strict
from mec_hub.models.heads import build_projector
from mec_hub.weights.checkpoint import TRAIN_FORMAT, read_checkpoint
from mec_hub.weights.config import (
    CARD_FILE,
    CONFIG_FILE,
    METADATA_KEY,
    MODEL_FILE,
    PROJECTOR_FILE,
    ModelConfig,
    check_build_args,
    preprocessing_fields,
)
from mec_hub.weights.integrity import sha256_file
from mec_hub.weights.registry import is_registered, model_info

# timm arguments that act in training only (dropout, drop-path, DropBlock: modules without weights),
# left out of the published description, which holds what the architecture needs.
TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What the authors' layout says about the weights' terms: their repository is under the MIT license and
# names no other terms for its checkpoints, which its code trains on ImageNet-1k (whose own terms apply too).
AUTHORS_LICENSE = (
    "MIT (github.com/xinliu20/MEC, the authors' code and checkpoints; it names no other terms for the weights)"
)
AUTHORS_DATASET = "ImageNet-1k (the authors' training data)"


@dataclass
class ExtractedWeights:
    """What a checkpoint yields: backbone and projector tensors plus what is known about them.

    ``preprocessing`` is in timm's ``pretrained_cfg`` vocabulary; keys it lacks take
    ``ModelConfig``'s defaults (the authors' ImageNet evaluation).
    """

    architecture: str
    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None
    layout: str
    model_args: dict[str, Any] = field(default_factory=dict)
    stem: str = "default"
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConversionResult:
    folder: Path
    config: ModelConfig
    digests: dict[str, str]
    layout: str
    dropped: list[str]


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _tensors(state: Mapping[str, Any], *, origin: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointReadError(f"{origin}: entry {key!r} of the state dict is not a tensor")
        out[_strip_wrappers(key)] = value
    return out


def _select(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_encoder(encoder: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Official encoder keys -> (backbone without ``fc``, projector = what was ``fc.*``)."""
    backbone = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
    projector = _select(encoder, "fc.")
    return backbone, projector


def extract_weights(
    checkpoint: Mapping[str, Any], *, source: str = "student", arch: str | None = None, origin: str = "checkpoint"
) -> ExtractedWeights:
    """Find the backbone (and projector) of ``source`` ("student" or "teacher") in any supported layout."""
    if source not in ("student", "teacher"):
        raise ValueError(f"source must be 'student' or 'teacher', not {source!r}")

    if checkpoint.get("format") == TRAIN_FORMAT:
        state = _tensors(checkpoint["model"], origin=origin)
        backbone = _select(state, f"{source}.backbone.")
        projector = _select(state, f"{source}.projector.")
        if not backbone:
            raise CheckpointReadError(f"{origin}: no {source}.backbone.* weights in this training checkpoint")
        info = checkpoint.get("export", {})
        return ExtractedWeights(
            architecture=arch or str(checkpoint["arch"]),
            backbone=backbone,
            projector=projector or None,
            layout="mec-hub training checkpoint",
            model_args={
                k: v for k, v in dict(checkpoint.get("model_args") or {}).items() if k not in TRAINING_ONLY_ARGS
            },
            stem=str(checkpoint.get("stem") or "default"),
            preprocessing=dict(info.get("preprocessing") or {}),
            meta={**dict(info.get("meta") or {}), "converted_from": f"{source} (backbone + projector)"},
        )

    raw = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(raw, Mapping):
        raise CheckpointReadError(f"{origin}: no state dict found (keys: {', '.join(map(str, checkpoint))})")
    state = _tensors(raw, origin=origin)
    official_prefix = "encoder." if source == "student" else "teacher."
    if any(k.startswith(("encoder.", "teacher.")) for k in state):
        encoder = _select(state, official_prefix)
        if not encoder:
            raise CheckpointReadError(
                f"{origin}: no {official_prefix}* weights for source={source!r}", arguments=("source",)
            )
        backbone, projector = _split_encoder(encoder)
        meta: dict[str, Any] = {
            "converted_from": f"official MEC checkpoint, {source} ({official_prefix[:-1]}.*)",
            "dataset": AUTHORS_DATASET,
            "license": AUTHORS_LICENSE,
        }
        if isinstance(checkpoint.get("epoch"), int):
            meta["epochs"] = checkpoint["epoch"]
        return ExtractedWeights(
            architecture=arch or str(checkpoint.get("arch") or "resnet50"),
            backbone=backbone,
            projector=projector or None,
            layout="official MEC checkpoint",
            meta=meta,
        )

    if source == "teacher":
        raise CheckpointReadError(
            f"{origin}: a plain state dict has no teacher; drop source='teacher'", arguments=("source",)
        )
    for prefix in ("backbone.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = _select(state, prefix)
    dropped = sorted(k for k in state if k.startswith("fc."))
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return ExtractedWeights(
        architecture=arch or str(checkpoint.get("arch") or "resnet50"),
        backbone=backbone,
        projector=None,
        layout="plain state dict",
        meta={"converted_from": "plain backbone state dict"},
        dropped=dropped,
    )


def _check_projector(projector: dict[str, torch.Tensor], *, origin: str) -> tuple[int, int, int]:
    """The projector's shape ``(in, hidden, out)``, once its tensors are known to fit it."""
    try:
        first, last = projector["0.weight"], projector["6.weight"]
    except KeyError as exc:
        raise IncompatibleWeightsError(f"{origin}: projector lacks {exc.args[0]!r}; not an MEC projector") from None
    dims = (int(first.shape[1]), int(first.shape[0]), int(last.shape[0]))
    load_state_dict_strict(build_projector(*dims), projector, origin=origin, target="MEC projector")
    return dims


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; clone gives each tensor its own.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sorted(state.items())}


def write_hub_folder(
    extracted: ExtractedWeights,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    overwrite: bool = False,
    origin: str = "checkpoint",
    extra_meta: Mapping[str, Any] | None = None,
) -> ConversionResult:
    """Validate the tensors against the architecture and write the folder atomically.

    What the checkpoint says about its architecture and preprocessing is held to the rules of
    ``config.json`` (``check_build_args``) before timm builds anything from it. An output that may
    not or cannot be written is one ``OutputPathError`` (``mec_hub.export.outputs``).
    """
    check_build_args(
        extracted.architecture, extracted.model_args, extracted.stem, extracted.preprocessing, origin=origin
    )
    backbone_module = build_backbone(extracted.architecture, extracted.model_args, extracted.stem)
    load_state_dict_strict(
        backbone_module, extracted.backbone, origin=origin, target=f"{extracted.architecture} backbone"
    )
    projector = _check_projector(extracted.projector, origin=origin) if extracted.projector else None
    num_features = int(backbone_module.num_features)
    if projector is not None and projector[0] != num_features:
        raise IncompatibleWeightsError(
            f"{origin}: projector takes {projector[0]} features, the backbone gives {num_features}"
        )
    meta = {**extracted.meta, **dict(extra_meta or {})}
    config = ModelConfig(
        name=name,
        architecture=extracted.architecture,
        num_features=num_features,
        model_args=extracted.model_args,
        stem=extracted.stem,
        **preprocessing_fields(extracted.preprocessing),
        projector=projector,
        meta=meta,
    )
    # One metadata key only: safetensors writes several in hash order, which would make the
    # digest of the same weights differ from one conversion to the next.
    header = {METADATA_KEY: json.dumps(config.to_json_dict(), sort_keys=True)}
    with (
        output_path(out_dir, folder=True, overwrite=overwrite) as out_dir,
        atomic_directory(out_dir, overwrite=overwrite) as tmp,
    ):
        save_file(_contiguous(extracted.backbone), str(tmp / MODEL_FILE), metadata=header)
        digests = {MODEL_FILE: sha256_file(tmp / MODEL_FILE)}
        if extracted.projector is not None:
            save_file(_contiguous(extracted.projector), str(tmp / PROJECTOR_FILE), metadata=header)
            digests[PROJECTOR_FILE] = sha256_file(tmp / PROJECTOR_FILE)
        config = replace(config, files=digests)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(render_model_card(config, layout=extracted.layout), encoding="utf-8")
    return ConversionResult(out_dir, config, digests, extracted.layout, extracted.dropped)


def convert_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    arch: str | None = None,
    source: str = "student",
    name: str | None = None,
    overwrite: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
) -> ConversionResult:
    """Read ``checkpoint`` (any supported layout) and write the hub folder ``out_dir``.

    ``name`` of a registered model says the checkpoint is that model's: its record's description
    (license, figures with their protocol and source, paper) is the card's, under what the
    checkpoint itself says.
    """
    check_output(out_dir, folder=True, overwrite=overwrite)  # before the work, not after it
    origin = str(checkpoint)
    extracted = extract_weights(read_checkpoint(checkpoint), source=source, arch=arch, origin=origin)
    if name is not None and is_registered(name):
        record = model_info(name)
        if record.config.architecture != extracted.architecture:
            raise IncompatibleWeightsError(
                f"{origin} holds a {extracted.architecture}, but model {name!r} of the registry is a "
                f"{record.config.architecture}: convert it under another name"
            )
        epochs, recorded = extracted.meta.get("epochs"), record.meta.get("epochs")
        if epochs is not None and recorded is not None and epochs != recorded:
            raise IncompatibleWeightsError(
                f"{origin} was trained for {epochs} epochs, but model {name!r} of the registry for {recorded}: "
                f"its figures are not this checkpoint's; convert it under another name"
            )
        extracted = replace(extracted, meta={**record.meta, **extracted.meta})
    meta = {"source_checkpoint": Path(checkpoint).name, **dict(extra_meta or {})}
    return write_hub_folder(extracted, out_dir, name=name, overwrite=overwrite, origin=origin, extra_meta=meta)
