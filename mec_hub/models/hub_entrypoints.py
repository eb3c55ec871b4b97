"""torch.hub entry points (re-exported by ``hubconf.py``): three lines each, one private factory.

Every entry point takes its arguments by keyword, as torchvision's builders do. ``weights=None``
(the default) and ``weights="DEFAULT"`` both load the model's own published weights: unlike
torchvision, ``None`` does not mean random weights here; ``pretrained=False`` does, and giving it
together with ``weights=`` is refused (``mec_hub.load``).
"""

from __future__ import annotations

import os
from typing import Any

from mec_hub.models.encoder import MECEncoder
from mec_hub.models.loading import load


def _load(name: str, pretrained: bool, weights: str | os.PathLike[str] | None, **kwargs: Any) -> MECEncoder:

    return load(name, weights=weights, pretrained=pretrained, **kwargs)


def mec_resnet50(
    *, weights: str | os.PathLike[str] | None = None, pretrained: bool = True, **kwargs: Any
) -> MECEncoder:
    """MEC ResNet-50, ImageNet-1k, 100 epochs, the authors' checkpoint: (N,3,224,224) -> (N,2048).

    70.8% ImageNet linear top-1 under the authors' linear protocol (main_lincls.py --lars), the
    figure of their repository's README for this checkpoint; not measured by mec-hub.

    weights: None (the default) or "DEFAULT": the published weights (none published yet: convert
    the authors' checkpoint with `mec-hub convert` and pass weights=); or a local folder or
    .safetensors file written by `mec-hub convert` (no network needed), hf-hub:org/name[@rev], or
    an https URL. None does not mean random weights, unlike torchvision.
    pretrained: False for random weights, with weights= left out (the two together are refused).
    kwargs: head ("backbone" | "projector"), device, cache_dir, endpoint.
    Preprocessing: mec_hub.get_transform(model) or model.pretrained_cfg.
    """
    return _load("mec_resnet50", pretrained, weights, **kwargs)


def mec_resnet18_cifar10s(
    *, weights: str | os.PathLike[str] | None = None, pretrained: bool = True, **kwargs: Any
) -> MECEncoder:
    """MEC half-width ResNet-18 trained by mec-hub on cifar10-subset, bundled (offline): (N,3,48,48) -> (N,224).

    weights: None (the default) or "DEFAULT": the bundled weights; or another copy of the same
    file (checked against the bundled SHA-256). None does not mean random weights, unlike
    torchvision. pretrained: False for random weights, with weights= left out (the two together
    are refused). kwargs: head ("backbone" | "projector"), device. Numbers and recipe:
    mec_hub.model_info("mec_resnet18_cifar10s").meta.
    """
    return _load("mec_resnet18_cifar10s", pretrained, weights, **kwargs)
