"""Small real weights made on the spot."""

from __future__ import annotations

from pathlib import Path


def make_tiny_hub_folder(out: Path, *, seed: int = 0, input_size: int = 32, name: str = "tiny_resnet18") -> Path:
    """A converted folder (random ResNet-18 + projector) with small-input preprocessing.

    Weights are random but with non-trivial BatchNorm statistics, so that an eval-mode forward
    is not the same as a train-mode one and a mix-up of the two shows.
    """
    import torch
    from torch import nn

    from mec_hub.export.convert import ExtractedWeights, write_hub_folder
    from mec_hub.models.encoder import build_backbone
    from mec_hub.models.heads import build_projector

    torch.manual_seed(seed)
    backbone = build_backbone("resnet18")
    projector = build_projector(512, 256, 128)
    for module in [*backbone.modules(), *projector.modules()]:
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    extracted = ExtractedWeights(
        architecture="resnet18",
        backbone=backbone.state_dict(),
        projector=projector.state_dict(),
        layout="test fixture",
        preprocessing={"input_size": (3, input_size, input_size), "crop_pct": 1.0, "interpolation": "bicubic"},
        meta={"license": "mit"},
    )
    write_hub_folder(extracted, out, name=name, overwrite=True)
    return out
