"""A backbone from any input, written for another framework: ``mec-hub convert --to detectron2|torchvision``.

An input is any checkpoint ``mec-hub convert`` reads (see ``mec_hub.export.convert``), or any
weights spec ``mec_hub.load`` takes: a folder (``mec-hub convert``'s, or timm's own
``config.json`` + ``model.safetensors``), a ``.safetensors`` file, a registry name,
``bundled:NAME``, ``hf-hub:org/name[@rev]``. Checkpoints go through ``read_checkpoint`` and
``extract_weights``; weights specs through ``mec_hub.weights.sources`` (their digests checked). Either way
the tensors are strictly loaded into the timm model they claim to be before anyone writes them
in another framework's layout (``mec_hub.export.detectron2``, ``mec_hub.export.torchvision_weights``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mec_hub.errors import CheckpointReadError, IncompatibleWeightsError, InvalidArgumentError
from mec_hub.export.convert import ExtractedWeights, extract_weights
from mec_hub.export.detectron2 import detectron2_config, to_detectron2, write_detectron2
from mec_hub.export.outputs import check_output
from mec_hub.export.torchvision_weights import torchvision_state_dict, write_torchvision
from mec_hub.models.encoder import build_backbone, load_state_dict_strict
from mec_hub.models.loading import DEFAULT_MODEL, without_classifier
from mec_hub.weights.checkpoint import read_checkpoint
from mec_hub.weights.config import preprocessing_fields
from mec_hub.weights.registry import model_info
from mec_hub.weights.sources import fetch_weights, parse_weights_spec, record_location
from mec_hub.weights.tensors import read_safetensors

FRAMEWORKS = ("detectron2", "torchvision")
# A missing path with one of these suffixes is a missing checkpoint, not a model name.
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".pkl")
# Arguments timm records for a model built as its architecture's defaults.
_DEFAULT_ARGS = {"in_chans": 3, "global_pool": "avg"}


@dataclass(frozen=True)
class TransferResult:
    out: Path
    framework: str
    architecture: str
    layout: str
    num_tensors: int
    dropped: list[str]  # classifier keys of the input, not exported
    config_lines: list[str]


def export_backbone(
    path: str | os.PathLike[str],
    framework: str,
    out: str | os.PathLike[str],
    *,
    source: str = "student",
    arch: str | None = None,
    overwrite: bool = False,
) -> TransferResult:
    """Write the backbone of ``path`` as ``framework`` ("detectron2" or "torchvision") reads it."""
    if framework not in FRAMEWORKS:
        raise InvalidArgumentError(f"framework must be one of {FRAMEWORKS}, not {framework!r}")
    check_output(out, folder=False, overwrite=overwrite)  # before the work, not after it
    origin = str(path)
    extracted = read_backbone(path, source=source, arch=arch)
    _require_standard(extracted, framework, origin=origin)
    lines: list[str] = []
    if framework == "detectron2":
        arrays = to_detectron2(extracted.backbone, origin=origin)
        written = write_detectron2(arrays, out, overwrite=overwrite)
        prep = preprocessing_fields(extracted.preprocessing)
        lines = detectron2_config(extracted.architecture, prep["mean"], prep["std"])
        count = len(arrays)
    else:
        state = torchvision_state_dict(extracted.architecture, extracted.backbone, origin=origin)
        written, count = write_torchvision(state, out, overwrite=overwrite), len(state)
    return TransferResult(
        out=written,
        framework=framework,
        architecture=extracted.architecture,
        layout=extracted.layout,
        num_tensors=count,
        dropped=list(extracted.dropped),
        config_lines=lines,
    )


def _require_standard(extracted: ExtractedWeights, framework: str, *, origin: str) -> None:
    """Detectron2 and torchvision build a ResNet from its depth alone: refuse other widths and stems."""
    custom = {k: v for k, v in extracted.model_args.items() if _DEFAULT_ARGS.get(k, object()) != v}
    if custom or extracted.stem != "default":
        what = f"model_args {custom}" if custom else f"the {extracted.stem!r} stem"
        raise IncompatibleWeightsError(
            f"{origin}: {framework} builds {extracted.architecture} only with its standard widths and stem; "
            f"these weights have {what}"
        )


def read_backbone(
    path: str | os.PathLike[str], *, source: str = "student", arch: str | None = None
) -> ExtractedWeights:
    """The backbone tensors (timm keys, no classifier) of ``path`` and what is known about them.

    ``arch`` names the architecture of a lone ``.safetensors`` file that does not say it, or
    overrides that of a checkpoint (as ``mec-hub convert --arch`` does).
    """
    origin = os.fspath(path)
    local = Path(origin)
    if (local.is_file() and local.suffix != ".safetensors") or (
        not local.exists() and local.suffix in _CHECKPOINT_SUFFIXES
    ):
        extracted = extract_weights(read_checkpoint(origin), source=source, arch=arch, origin=origin)
    else:
        extracted = _read_weights_spec(origin, arch=arch)
    module = build_backbone(extracted.architecture, extracted.model_args, extracted.stem)
    load_state_dict_strict(module, extracted.backbone, origin=origin, target=f"{extracted.architecture} backbone")
    return extracted


def _read_weights_spec(origin: str, *, arch: str | None) -> ExtractedWeights:
    spec = parse_weights_spec(origin)
    record = None
    if spec.kind in ("registry", "default"):
        record = model_info(spec.value if spec.kind == "registry" else DEFAULT_MODEL)
        spec = record_location(record)
    try:
        local = fetch_weights(spec, record=record)
    except CheckpointReadError:
        # A bare state dict in safetensors says nothing about its architecture: --arch does.
        if spec.kind != "file" or arch is None:
            raise
        return ExtractedWeights(
            architecture=arch,
            backbone=read_safetensors(spec.value, origin=origin),
            projector=None,
            layout="safetensors state dict",
        )
    config = local.config
    state = read_safetensors(local.model_file, origin=origin)
    backbone = without_classifier(state, config.classifier)
    return ExtractedWeights(
        architecture=arch or config.architecture,
        backbone=backbone,
        projector=None,
        layout={"folder": "folder", "file": "safetensors file"}.get(spec.kind, f"{spec.kind} weights"),
        model_args=dict(config.model_args),
        stem=config.stem,
        preprocessing=config.pretrained_cfg,
        meta=dict(config.meta),
        dropped=sorted(set(state) - set(backbone)),
    )

