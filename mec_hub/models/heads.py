"""The MEC projector and predictor, laid out exactly as in the authors' code.

Keeping the official module order makes checkpoint keys map one to one: the authors' ResNet
``fc`` (projector) indices 0..7 are this ``nn.Sequential``'s indices.
"""

from __future__ import annotations

from torch import nn


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """3-layer MLP ending in ``BatchNorm1d(affine=False)`` (the official MEC projector)."""
    projector = nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
        nn.BatchNorm1d(out_dim, affine=False),
    )
    # The bias is kept for key compatibility with the official checkpoint, but a BatchNorm
    # follows it, so training it would only waste an optimizer slot.
    projector[6].bias.requires_grad_(False)
    return projector


def build_predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """2-layer bottleneck MLP (hidden 512 in the paper)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )
