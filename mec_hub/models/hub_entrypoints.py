"""torch.hub entry points (re-exported by ``hubconf.py``): three lines each, one private factory."""

from __future__ import annotations

import os
from typing import Any

from mec_hub.models.encoder import MECEncoder
from mec_hub.models.loading import load


def _load(name: str, pretrained: bool, weights: str | os.PathLike[str] | None, **kwargs: Any) -> MECEncoder:

    return load(name, weights=weights, pretrained=pretrained, **kwargs)


def mec_resnet50(pretrained: bool = True, weights: str | os.PathLike[str] | None = None, **kwargs: Any) -> MECEncoder:
    """MEC ResNet-50, ImageNet-1k, 100 epochs, the authors' checkpoint: (N,3,224,224) -> (N,2048).

    70.8% ImageNet linear top-1 under the authors' linear protocol (main_lincls.py --lars), the
    figure of their repository's README for this checkpoint; not measured by mec-hub.

    pretrained: False for random weights. weights: a local folder or .safetensors file written by
    `mec-hub convert` (no network needed), hf-hub:org/name[@rev], or an https URL; default: the
    published location (none yet: convert the authors' checkpoint with `mec-hub convert` and pass
    weights=). kwargs: head ("backbone" | "projector"), device, cache_dir, endpoint.
    Preprocessing: mec_hub.get_transform(model) or model.pretrained_cfg.
    """
    return _load("mec_resnet50", pretrained, weights, **kwargs)


def mec_resnet18_cifar10s(
    pretrained: bool = True, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> MECEncoder:
    """MEC half-width ResNet-18 trained by mec-hub on cifar10-subset, bundled (offline): (N,3,48,48) -> (N,224).

    pretrained: False for random weights. weights: another copy of the same file (checked against
    the bundled SHA-256). kwargs: head ("backbone" | "projector"), device. Numbers and recipe:
    mec_hub.model_info("mec_resnet18_cifar10s").meta.
    """
    return _load("mec_resnet18_cifar10s", pretrained, weights, **kwargs)
