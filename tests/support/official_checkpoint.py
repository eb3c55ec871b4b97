"""Synthetic checkpoints in the authors' layout, built the way their code builds its model.

The MEC reference code wraps a torchvision ResNet whose ``fc`` becomes the 3-layer projector,
adds a predictor and a deep-copied teacher, trains under DistributedDataParallel (hence the
``module.`` prefix) and saves ``{"epoch", "arch", "state_dict", "optimizer"}``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torchvision
from torch import nn


class OfficialMEC(nn.Module):
    def __init__(self, arch: str = "resnet18", dim: int = 64, pred_dim: int = 16) -> None:
        super().__init__()
        self.encoder = getattr(torchvision.models, arch)(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False),
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False),
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            self.encoder.fc,
            nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )
        self.teacher = copy.deepcopy(self.encoder)

    def pooled(self, x: torch.Tensor, network: str = "encoder") -> torch.Tensor:
        """The backbone's pooled features: everything of the ResNet before ``fc``."""
        net = getattr(self, network)
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)


def randomize_statistics(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics and affine values (and the teacher its own weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                    module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 0.4 - 0.2)


def make_official_checkpoint(path: Path, *, arch: str = "resnet18", dim: int = 64, seed: int = 0) -> OfficialMEC:
    torch.manual_seed(seed)
    model = OfficialMEC(arch, dim=dim)
    randomize_statistics(model, seed)
    with torch.no_grad():  # the EMA teacher differs from the student after training
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return model.eval()
