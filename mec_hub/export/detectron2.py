"""A ResNet backbone as Detectron2's ImageNet-style initialisation file (``MODEL.WEIGHTS: r50.pkl``).

timm and torchvision name a ResNet after its Python attributes; Detectron2's ResNet
(``detectron2/modeling/backbone/resnet.py``) after its own modules:

* the stem: timm's ``conv1`` and ``bn1`` are one Detectron2 ``Conv2d`` that carries its norm,
  ``stem.conv1`` and ``stem.conv1.norm``;
* the stages: timm's ``layer1..layer4`` are ``res2..res5`` (named by the stride 2^k of their
  output), and their blocks keep their index;
* inside a block: ``convK`` keeps its name and ``bnK``, the norm after it, becomes
  ``convK.norm``; the projection shortcut ``downsample.0`` (conv) and ``downsample.1`` (its
  norm) becomes ``shortcut`` and ``shortcut.norm``.

BatchNorm keeps ``weight``, ``bias``, ``running_mean`` and ``running_var`` (what Detectron2's
BatchNorm, SyncBN and FrozenBN hold); ``num_batches_tracked`` has no counterpart and is dropped,
as is a classifier ``fc``. The file is the pickle Detectron2's ``DetectionCheckpointer`` reads
for a model-zoo ``.pkl``: ``{"model": {name: numpy array}, "__author__": ...,
"matching_heuristics": True}``; the heuristics then match ``stem.conv1.weight`` to
``backbone.bottom_up.stem.conv1.weight`` and so on.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mec_hub.errors import IncompatibleWeightsError
from mec_hub.export.outputs import output_path
from mec_hub.fileio import atomic_write

AUTHOR = "mec-hub"
PICKLE_PROTOCOL = 4
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
_BLOCK = re.compile(r"layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<part>conv\d|bn\d|downsample\.[01])")
# Detectron2's RESNETS.DEPTH of the timm/torchvision ResNets it builds.
_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def detectron2_key(key: str) -> str | None:
    """Detectron2's name for the timm/torchvision ResNet key ``key``; ``None`` for keys it drops.

    Raises ``IncompatibleWeightsError`` for a key Detectron2's ResNet has no place for.
    """
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked" or module == "fc":
        return None
    if module == "conv1" and param == "weight":
        return "stem.conv1.weight"
    if module == "bn1" and param in _NORM_PARAMS:
        return f"stem.conv1.norm.{param}"
    match = _BLOCK.fullmatch(module)
    if match:
        block = f"res{int(match['stage']) + 1}.{match['block']}"
        part = match["part"]
        if part.startswith("conv") and param == "weight":
            return f"{block}.{part}.weight"
        if part.startswith("bn") and param in _NORM_PARAMS:
            return f"{block}.conv{part[2:]}.norm.{param}"
        if part == "downsample.0" and param == "weight":
            return f"{block}.shortcut.weight"
        if part == "downsample.1" and param in _NORM_PARAMS:
            return f"{block}.shortcut.norm.{param}"
    raise IncompatibleWeightsError(
        f"{key!r} has no place in Detectron2's ResNet (stem conv1/bn1, layer1-4 blocks of convK/bnK and "
        f"downsample); only torchvision-style ResNets (timm's resnet18-152, wide_resnet, resnext) convert"
    )


def to_detectron2(backbone: Mapping[str, torch.Tensor], *, origin: str = "backbone") -> dict[str, np.ndarray]:
    """The backbone's tensors under Detectron2's names, as NumPy arrays of the same dtype and values."""
    conv1 = backbone.get("conv1.weight")
    if conv1 is None:
        raise IncompatibleWeightsError(f"{origin}: no conv1.weight; not a ResNet with a single-convolution stem")
    if tuple(conv1.shape[-2:]) != (7, 7):
        raise IncompatibleWeightsError(
            f"{origin}: the stem convolution is {conv1.shape[-2]}x{conv1.shape[-1]}; Detectron2's ResNet stem is "
            f"7x7/2 with max-pool (a small-image stem does not transfer)"
        )
    out: dict[str, np.ndarray] = {}
    for key, tensor in backbone.items():
        try:
            name = detectron2_key(key)
        except IncompatibleWeightsError as exc:
            raise IncompatibleWeightsError(f"{origin}: {exc}") from None
        if name is not None:
            t = tensor.detach().cpu()
            out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


class _PortablePickler(pickle.Pickler):
    """Pickles arrays as ``numpy.ndarray(shape, dtype, buffer=bytearray)``.

    NumPy 2 pickles arrays through ``numpy._core.multiarray``, which NumPy before 1.26.1 cannot
    import, and Detectron2 installs often have an older NumPy. ``numpy.ndarray`` and
    ``bytearray`` exist under those names in every version; the array comes back writable and
    C-contiguous, with the same bytes.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.dtype.kind in "biuf":
            data = np.ascontiguousarray(obj)
            return np.ndarray, (data.shape, data.dtype.str, bytearray(data.tobytes()))
        return NotImplemented


def write_detectron2(arrays: Mapping[str, np.ndarray], out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the pickle Detectron2 reads (``{"model": arrays, "__author__", "matching_heuristics"}``).

    An output that may not or cannot be written is one ``OutputPathError`` (``mec_hub.export.outputs``).
    """
    payload = {"model": dict(arrays), "__author__": AUTHOR, "matching_heuristics": True}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            _PortablePickler(fh, protocol=PICKLE_PROTOCOL).dump(payload)

    with output_path(out, folder=False, overwrite=overwrite) as path:
        return atomic_write(path, write)


def detectron2_config(architecture: str, mean: Sequence[float], std: Sequence[float]) -> list[str]:
    """The Detectron2 config lines these weights need, as MoCo's detection configs set them.

    The pixel statistics are the weights' own (0-1 RGB) times 255, in RGB order; the stride sits
    in the 3x3 convolution (torchvision style, ``STRIDE_IN_1X1: False``); BatchNorm is
    fine-tuned as SyncBN, in the backbone and in the FPN.
    """
    lines = [
        "MODEL.WEIGHTS: <this file>",
        f"MODEL.PIXEL_MEAN: {[round(255 * m, 3) for m in mean]}",
        f"MODEL.PIXEL_STD: {[round(255 * s, 3) for s in std]}",
        "INPUT.FORMAT: RGB",
    ]
    depth = _DEPTHS.get(architecture)
    if depth is not None:
        lines.append(f"MODEL.RESNETS.DEPTH: {depth}")
        if depth < 50:
            lines.append("MODEL.RESNETS.RES2_OUT_CHANNELS: 64")
    lines += [
        "MODEL.RESNETS.STRIDE_IN_1X1: False",
        "MODEL.RESNETS.NORM: SyncBN",
        "MODEL.FPN.NORM: SyncBN",
        "MODEL.BACKBONE.FREEZE_AT: 0",
    ]
    return lines
