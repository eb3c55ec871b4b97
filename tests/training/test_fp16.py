"""fp16 training: a step the GradScaler skips (inf/NaN gradients) leaves the whole model as it was.

The recipe: the EMA teacher follows the student *after an optimizer step*. When the scaler finds
inf/NaN gradients it skips the optimizer step, so the student does not move, and neither may the
teacher. The expected states are written here from that rule and the EMA formula
``teacher = mu * teacher + (1 - mu) * student``, not taken from the code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mec_hub.models.heads import build_predictor, build_projector
from mec_hub.models.losses import MECLoss
from mec_hub.runtime.devices import Precision
from training.engine import train_step
from training.model import Encoder, MECModel
from training.schedules import ScheduleValues

M, D = 8, 16
MU = 0.5  # a strong EMA, so that a wrong teacher update is far beyond rounding
# A scale at which this model's fp16 gradients do not overflow (at the default 2**16 they do, and
# the first step is skipped): here only the injected inf makes the scaler skip.
INIT_SCALE = 256.0


def make_model() -> MECModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = MECModel(Encoder(backbone, build_projector(8, 12, D)), build_predictor(D, 6))
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))
    return model


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def fp16_step(model: MECModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, poison: bool):
    handle = None
    if poison:  # one inf gradient: the scaler must skip this step
        weight = model.student.backbone[0].weight
        handle = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(M, 3, 16, 16, generator=g), torch.randn(M, 3, 16, 16, generator=g))
    try:
        train_step(
            model,
            model.update_teacher,
            MECLoss(64.0, 4),
            optimizer,
            views,
            ScheduleValues(lr=0.1, teacher_momentum=MU, lamda_inv=M * 64.0 / D),
            Precision("fp16", "cpu"),
            scaler,
        )
    finally:
        if handle is not None:
            handle.remove()


def test_a_step_the_scaler_skips_moves_neither_student_nor_teacher():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    student, teacher = params(model.student), params(model.teacher)
    scale = scaler.get_scale()

    fp16_step(model, optimizer, scaler, poison=True)

    assert scaler.get_scale() < scale  # the scaler did see the inf and skipped (and backed off)
    for key, value in params(model.student).items():
        assert torch.equal(value, student[key]), key
    for key, value in params(model.teacher).items():
        assert torch.equal(value, teacher[key]), key  # no EMA step without an optimizer step


def test_a_step_the_scaler_takes_updates_the_teacher_by_the_ema():
    """The same step without the inf gradient: the teacher is mu * teacher + (1 - mu) * student_after."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    teacher = params(model.teacher)

    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    fp16_step(model, optimizer, scaler, poison=False)

    assert scaler.get_scale() == INIT_SCALE  # the scaler took the step

    student_after = params(model.student)
    moved = 0.0
    for key, value in params(model.teacher).items():
        expected = MU * teacher[key] + (1 - MU) * student_after[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        moved = max(moved, float((value - teacher[key]).abs().max()))
    assert moved > 0.1
