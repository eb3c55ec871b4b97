"""The MEC training model: student (backbone + projector), predictor, and EMA teacher.

State-dict keys are ``student.backbone.*``, ``student.projector.*``, ``teacher.backbone.*``,
``teacher.projector.*`` and ``predictor.*``: what ``mec_hub.export.convert`` reads from training
checkpoints. The backbone is any timm architecture (``mec_hub.models.encoder.build_backbone``); the
heads have the official layout (``mec_hub.models.heads``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mec_hub.models.encoder import build_backbone
from mec_hub.models.heads import build_predictor, build_projector


class Encoder(nn.Module):
    """Backbone followed by the projector: ``(N, 3, H, W) -> (N, dim)``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


class MECModel(nn.Module):
    """Student, predictor and teacher of the official recipe.

    ``forward(x1, x2)`` returns ``(p1, p2, z1, z2)``: ``p_i = predictor(student(x_i))`` and
    ``z_i = teacher(x_i)``, the latter without gradient. Each view is its own batch, as in the
    official code, so BatchNorm statistics are per view. The teacher stays in train mode like
    the student (its BatchNorms use batch statistics and update their own running averages).
    """

    def __init__(self, student: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.predictor = predictor
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p1 = self.predictor(self.student(x1))
        p2 = self.predictor(self.student(x2))
        with torch.no_grad():
            z1 = self.teacher(x1)
            z2 = self.teacher(x2)
        return p1, p2, z1, z2

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` over parameters (not buffers)."""
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def build_mec_model(
    arch: str = "resnet50",
    model_args: Mapping[str, Any] | None = None,
    *,
    stem: str = "default",
    dim: int = 2048,
    hidden_dim: int | None = None,
    pred_dim: int = 512,
) -> MECModel:
    """A timm ``arch`` backbone with the 3-layer projector (hidden ``hidden_dim``, default = its feature
    size, as in the official code) to ``dim``, and the 2-layer predictor (hidden ``pred_dim``)."""
    backbone = build_backbone(arch, model_args, stem)
    features = int(backbone.num_features)
    projector = build_projector(features, hidden_dim or features, dim)
    return MECModel(Encoder(backbone, projector), build_predictor(dim, pred_dim))


def _meta_model(arch: str, model_args: Mapping[str, Any]) -> nn.Module:
    """The timm model built on the meta device: no memory, no weights, no data."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0, **model_args)


def model_args_error(arch: str, model_args: Mapping[str, Any]) -> str | None:
    """Why timm's ``arch`` cannot take ``model_args`` (one line naming the argument and the accepted ones), or None.

    The model is built on the meta device, so a wrong keyword is found before any data is read or
    memory allocated. Another failure there (an unknown architecture, a model that cannot be built
    on the meta device) is left to the real build, which says why.
    """
    if not model_args:
        return None
    try:
        _meta_model(arch, model_args)
    except TypeError as exc:
        problem = str(exc)
    except Exception:
        return None
    else:
        return None
    given = json.dumps(dict(model_args))
    try:
        model_class = type(_meta_model(arch, {}))
    except Exception:
        return f"--model-args {given}: timm cannot build {arch} with them ({problem})"
    parameters = inspect.signature(model_class.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return f"--model-args {given}: timm cannot build {arch} ({model_class.__name__}) with them ({problem})"
    accepted = [p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [key for key in model_args if key not in accepted]
    if not unknown:
        return f"--model-args {given}: timm cannot build {arch} ({model_class.__name__}) with them ({problem})"
    close = difflib.get_close_matches(unknown[0], accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"--model-args: architecture {arch} ({model_class.__name__}) takes no argument {unknown[0]!r}{hint}; "
        f"it takes: {', '.join(accepted)}"
    )
