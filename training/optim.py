"""Optimizers: the official SGD, and LARS for very large batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars")


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017, https://arxiv.org/abs/1708.03888) as MoCo v3 and BYOL use it.

    SGD with momentum whose update of each weight matrix is rescaled by the trust ratio
    ``trust_coefficient * ||w|| / ||g + wd * w||``. Biases and normalisation parameters (1-D
    tensors) get neither weight decay nor the rescaling. The learning rate is set per step
    from outside, like SGD's. Updates use ``torch._foreach_*`` ops, one kernel per step and
    kind of tensor rather than one per parameter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0 and trust_coefficient > 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            matrices = [i for i, p in enumerate(params) if p.ndim > 1]
            if matrices:
                weights = [params[i] for i in matrices]
                updates = [grads[i] for i in matrices]
                if group["weight_decay"]:
                    updates = torch._foreach_add(updates, weights, alpha=group["weight_decay"])
                weight_norms = torch.stack(torch._foreach_norm(weights))
                update_norms = torch.stack(torch._foreach_norm(updates))
                ratio = torch.where(
                    (weight_norms > 0) & (update_norms > 0),
                    group["trust_coefficient"] * weight_norms / update_norms,
                    torch.ones_like(weight_norms),
                )
                updates = torch._foreach_mul(updates, list(ratio.unbind()))
                for i, update in zip(matrices, updates, strict=True):
                    grads[i] = update
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, model: nn.Module, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``sgd``: the official optimizer (weight decay on every parameter); ``lars``: see :class:`LARS`.

    Frozen parameters (the teacher, the projector's last bias) are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, not {name!r}")
