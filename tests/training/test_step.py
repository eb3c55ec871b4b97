"""training/engine.py's step against the MEC recipe written out here with plain tensor ops.

The production side is the real wiring of training/pretrain.py: ``MECModel`` (student, predictor,
EMA teacher), ``MECLoss``, ``build_optimizer("sgd")``, ``Schedules`` and ``train_step``. The
reference side knows only the recipe:

* student = backbone + projector, predictor on top; teacher = EMA copy of backbone + projector,
  run in train mode (batch statistics, its own running averages) without gradient;
* loss = ``-(tr1 + tr2) / (2m) * (1/lamda)``, ``tr1`` the order-4 Taylor series of
  ``logdet(I + lamda * P1 Z2^T)`` on L2-normalised rows, ``tr2`` the same for ``(P2, Z1)``, with
  ``1/lamda`` warmed up linearly from ``8 * m * eps^2 / d`` to ``m * eps^2 / d``;
* SGD with momentum 0.9 and weight decay on every trained parameter (the projector's last bias
  is frozen: a BatchNorm follows it), the learning rate of the warm-up + cosine schedule;
* after the optimizer step, ``teacher = mu * teacher + (1 - mu) * student`` (parameters only),
  ``mu`` a half cosine from 0.996 to 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mec_hub.models.heads import build_predictor, build_projector
from mec_hub.models.losses import MECLoss
from training.engine import Precision, train_step
from training.model import Encoder, MECModel
from training.optim import build_optimizer
from training.schedules import Schedules

M, D = 8, 16  # batch, embedding
FEATURES, HIDDEN, PRED_HIDDEN = 8, 12, 6
EPS2 = 64.0
BASE_LR = 0.5 * M / 256  # the official lr scaling
SGD_MOMENTUM, WEIGHT_DECAY = 0.9, 1e-5
TEACHER_MOMENTUM, LAMDA_FACTOR = 0.996, 8.0
TOTAL, LR_WARMUP, LAMDA_WARMUP = 10, 3, 4
FIRST_STEP = 1  # inside both warm-ups, where the learning rate is not zero
BN_MOMENTUM, BN_EPS = 0.1, 1e-5
FROZEN = {"student.projector.6.bias"}


def tiny_backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, FEATURES, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(FEATURES),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def make_model() -> MECModel:
    torch.manual_seed(0)
    student = Encoder(tiny_backbone(), build_projector(FEATURES, HIDDEN, D))
    return MECModel(student, build_predictor(D, PRED_HIDDEN)).double()


def make_views(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(M, 3, 8, 8, generator=g, dtype=torch.float64),
         torch.randn(M, 3, 8, 8, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# the recipe, written out


def lr_at(step: int) -> float:
    if step < LR_WARMUP:  # np.linspace(0, base, warmup)
        return BASE_LR * step / (LR_WARMUP - 1)
    t = (step - LR_WARMUP) / (TOTAL - LR_WARMUP)
    return 0.5 * BASE_LR * (1 + math.cos(math.pi * t))


def teacher_momentum_at(step: int) -> float:
    return 1 - (1 - TEACHER_MOMENTUM) * 0.5 * (1 + math.cos(math.pi * step / TOTAL))


def lamda_inv_at(step: int) -> float:
    final = M * EPS2 / D  # 1 / lamda, lamda = d / (m eps^2)
    if step < LAMDA_WARMUP:
        return LAMDA_FACTOR * final + (final - LAMDA_FACTOR * final) * step / (LAMDA_WARMUP - 1)
    return final


def batch_norm(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """Train-mode BatchNorm: batch statistics, running averages (unbiased variance) updated in ``state``."""
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = x.mean(dim=dims)
    var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
    n = x.numel() // x.shape[1]
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS)
    if prefix + "weight" in state:
        y = y * state[prefix + "weight"].view(shape) + state[prefix + "bias"].view(shape)
    state[prefix + "running_mean"] = (1 - BN_MOMENTUM) * state[prefix + "running_mean"] + BN_MOMENTUM * mean.detach()
    state[prefix + "running_var"] = (1 - BN_MOMENTUM) * state[prefix + "running_var"] + BN_MOMENTUM * (
        var.detach() * n / (n - 1)
    )
    state[prefix + "num_batches_tracked"] = state[prefix + "num_batches_tracked"] + 1
    return y


def encoder(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    """``p`` is ``"student."`` or ``"teacher."``: the backbone and projector laid out above."""
    b, h = p + "backbone.", p + "projector."
    x = torch.relu(batch_norm(torch.nn.functional.conv2d(x, s[b + "0.weight"], stride=2, padding=1), s, b + "1."))
    x = torch.relu(torch.nn.functional.conv2d(x, s[b + "3.weight"], s[b + "3.bias"], padding=1))
    x = torch.relu(batch_norm(torch.nn.functional.conv2d(x, s[b + "5.weight"], stride=2, padding=1), s, b + "6."))
    x = x.mean(dim=(2, 3))
    x = torch.relu(batch_norm(x @ s[h + "0.weight"].T, s, h + "1."))
    x = torch.relu(batch_norm(x @ s[h + "3.weight"].T, s, h + "4."))
    return batch_norm(x @ s[h + "6.weight"].T + s[h + "6.bias"], s, h + "7.")


def predictor(x: Tensor, s: dict[str, Tensor]) -> Tensor:
    x = torch.relu(batch_norm(x @ s["predictor.0.weight"].T, s, "predictor.1."))
    return x @ s["predictor.3.weight"].T + s["predictor.3.bias"]


def taylor_logdet(a: Tensor, b: Tensor, lamda: float) -> Tensor:
    """Order-4 series of ``logdet(I + lamda * a b^T)`` on L2-normalised rows."""
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True)
    c = lamda * a @ b.T
    return sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(c, k)) for k in range(1, 5))


def reference_run(initial: dict[str, Tensor], steps: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The state after ``steps`` steps from ``initial``, and SGD's momentum buffers."""
    state = {k: v.clone() for k, v in initial.items()}
    trained = [k for k, v in state.items() if k.startswith(("student.", "predictor.")) and v.is_floating_point()]
    trained = [k for k in trained if "running_" not in k and k not in FROZEN]
    momentum: dict[str, Tensor] = {}
    for step, (v1, v2) in zip(range(FIRST_STEP, FIRST_STEP + steps), make_views(steps), strict=True):
        for k in trained:
            state[k] = state[k].detach().requires_grad_()
        p1 = predictor(encoder(v1, state, "student."), state)
        p2 = predictor(encoder(v2, state, "student."), state)
        with torch.no_grad():
            z1, z2 = encoder(v1, state, "teacher."), encoder(v2, state, "teacher.")
        lamda_inv = lamda_inv_at(step)
        traces = taylor_logdet(p1, z2, 1 / lamda_inv) + taylor_logdet(p2, z1, 1 / lamda_inv)
        loss = -traces / (2 * M) * lamda_inv
        grads = torch.autograd.grad(loss, [state[k] for k in trained])
        with torch.no_grad():
            for k, g in zip(trained, grads, strict=True):
                g = g + WEIGHT_DECAY * state[k]
                momentum[k] = g if k not in momentum else SGD_MOMENTUM * momentum[k] + g
                state[k] = state[k] - lr_at(step) * momentum[k]
            mu = teacher_momentum_at(step)
            for k in list(state):
                student_key = "student." + k.removeprefix("teacher.")
                if k.startswith("teacher.") and "running_" not in k and "num_batches" not in k:
                    state[k] = mu * state[k] + (1 - mu) * state[student_key]
    return {k: v.detach() for k, v in state.items()}, momentum


# --------------------------------------------------------------------------------------------
# the project's step


def project_run(steps: int) -> tuple[MECModel, torch.optim.Optimizer]:
    model = make_model()
    schedules = Schedules(
        total_steps=TOTAL,
        lr=BASE_LR,
        lr_warmup_steps=LR_WARMUP,
        lamda_inv=M * EPS2 / D,
        lamda_warmup_steps=LAMDA_WARMUP,
        lamda_warmup_factor=LAMDA_FACTOR,
        teacher_momentum=TEACHER_MOMENTUM,
    )
    criterion = MECLoss(EPS2, 4)
    optimizer = build_optimizer("sgd", model, lr=BASE_LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    precision = Precision("fp32", "cpu")
    for step, views in zip(range(FIRST_STEP, FIRST_STEP + steps), make_views(steps), strict=True):
        train_step(model, model.update_teacher, criterion, optimizer, views, schedules.at(step), precision)
    return model, optimizer


@pytest.mark.parametrize("steps", [1, 3])
def test_train_step_follows_the_recipe(steps):
    initial = {k: v.clone() for k, v in make_model().state_dict().items()}
    want, want_momentum = reference_run(initial, steps)
    model, optimizer = project_run(steps)
    got = model.state_dict()

    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")
    params = dict(model.named_parameters())
    assert {k for k, p in params.items() if p in optimizer.state} == set(want_momentum)
    for key, buffer in want_momentum.items():
        torch.testing.assert_close(optimizer.state[params[key]]["momentum_buffer"], buffer, rtol=0, atol=1e-12)
    # The run moved the student, its running statistics and the teacher well beyond the tolerance.
    for key in ("student.backbone.0.weight", "teacher.backbone.0.weight", "teacher.projector.1.running_mean"):
        assert (want[key] - initial[key]).abs().max() > 1e-6, key
