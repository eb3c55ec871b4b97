"""BatchNorm folding keeps a model's outputs and only touches the pairs it may."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import mec_hub
from mec_hub.embedding.optimize import fold_batchnorm


def count(module: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in module.modules())


def test_folded_resnet_gives_the_same_features(tiny_weights_dir: Path):
    model = mec_hub.load(weights=tiny_weights_dir, head="projector")
    folded, pairs = fold_batchnorm(model)
    assert pairs == count(model.backbone, nn.BatchNorm2d) == 20 and count(folded, nn.BatchNorm2d) == 0
    assert count(folded, nn.BatchNorm1d) == 3  # the projector's BatchNorm1d layers are left alone
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-5)
    assert count(model, nn.BatchNorm2d) == 20  # the original is untouched


class Branching(nn.Module):
    """conv -> bn, but the conv output is also used elsewhere: folding would change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_pairs_that_cannot_be_folded_are_left_alone():
    model = Branching().eval()
    model.bn.running_mean.uniform_(-1, 1)
    same, pairs = fold_batchnorm(model)
    assert pairs == 0 and same is model

    class Untraceable(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > 0 else x  # control flow on a tensor value

    untraceable = Untraceable(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(untraceable) == (untraceable, 0)
