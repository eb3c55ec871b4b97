"""A ResNet backbone as a torchvision state dict (``torchvision.models.resnet50().load_state_dict``).

timm's ResNets keep torchvision's attribute names (``conv1``, ``bn1``, ``layerN.B.convK``,
``layerN.B.bnK``, ``layerN.B.downsample.0/1``) and compute the same function, so the backbone's
tensors go over unchanged; the classifier ``fc`` is left out, so that torchvision reports
exactly ``fc.weight`` and ``fc.bias`` missing under ``strict=False``. MMDetection's ResNet uses
the same names, so the file serves as its ``init_cfg=dict(type="Pretrained", checkpoint=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from mec_hub.errors import IncompatibleWeightsError
from mec_hub.export.outputs import output_path
from mec_hub.fileio import atomic_write
from mec_hub.models.encoder import load_state_dict_strict


def torchvision_state_dict(
    architecture: str,
    backbone: Mapping[str, torch.Tensor],
    *,
    origin: str = "backbone",
) -> dict[str, torch.Tensor]:
    """The backbone's tensors, checked to fit ``torchvision.models.<architecture>()`` less its ``fc``."""

    if architecture not in models.list_models(module=models):
        raise IncompatibleWeightsError(
            f"{origin}: torchvision has no {architecture!r}; framework='torchvision' takes its ResNets "
            f"(resnet18-152, wide_resnet50_2, resnext50_32x4d, ...)",
            arguments=("framework",),
        )
    model = models.get_model(architecture, weights=None)
    model.fc = nn.Identity()
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(backbone.items())}
    load_state_dict_strict(model, state, origin=origin, target=f"torchvision {architecture} (without fc)")
    return state


def write_torchvision(
    state: Mapping[str, torch.Tensor], out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """``torch.save`` the state dict (tensors only: ``torch.load(weights_only=True)`` reads it).

    An output that may not or cannot be written is one ``OutputPathError`` (``mec_hub.export.outputs``).
    """
    with output_path(out, folder=False, overwrite=overwrite) as path:
        return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))
