"""One MEC training step, and the per-step statistics a run logs without syncing every step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mec_hub.models.losses import MECLoss, MECLossOutput
from mec_hub.runtime.devices import Precision
from training.schedules import ScheduleValues


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before anything is saved."""


def train_step(
    model: nn.Module,
    update_teacher: Callable[[float], None],
    criterion: MECLoss,
    optimizer: torch.optim.Optimizer,
    views: tuple[Tensor, Tensor],
    values: ScheduleValues,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    *,
    estimate_norm: bool = True,
) -> MECLossOutput:
    """Forward both views, the symmetric MEC loss, one optimizer step, then the teacher's EMA step.

    ``estimate_norm``: whether the loss estimates ``||C||_2`` this step (only logged steps need it).
    """
    for group in optimizer.param_groups:
        group["lr"] = values.lr
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        p1, p2, z1, z2 = model(*views)
    out = criterion(p1, z1, p2, z2, lamda_inv=values.lamda_inv, estimate_norm=estimate_norm)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        optimizer.step()
    update_teacher(values.teacher_momentum)
    return out


@dataclass
class StepStats:
    """Per-step loss statistics kept on the device and read back in one transfer per log.

    ``flush`` raises :class:`NonFiniteLossError` naming the first bad step.
    """

    first_step: int = 0
    _rows: list[Tensor] = field(default_factory=list)

    def add(self, out: MECLossOutput) -> None:
        self._rows.append(torch.stack([out.loss.detach(), out.coding_length, out.spectral_norm]).float())

    def __len__(self) -> int:
        return len(self._rows)

    def state_dict(self) -> dict[str, object]:
        rows = torch.stack(self._rows).cpu() if self._rows else torch.zeros(0, 3)
        return {"first_step": self.first_step, "rows": rows}

    def load_state_dict(self, state: dict[str, object], device: torch.device | str = "cpu") -> None:
        self.first_step = int(state["first_step"])  # type: ignore[arg-type]
        self._rows = [row.to(device) for row in state["rows"]]  # type: ignore[union-attr]

    def check_finite(self, *, steps_per_epoch: int, advice: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if a step since the last flush had a NaN/inf loss (one sync)."""
        if self._rows and not bool(torch.isfinite(torch.stack(self._rows)[:, :2]).all()):
            self.flush(steps_per_epoch=steps_per_epoch, advice=advice)

    def flush(self, *, steps_per_epoch: int, advice: str = "") -> dict[str, float]:
        """Mean loss and coding length, max spectral norm of the steps added since the last flush."""
        if not self._rows:
            return {}
        rows = torch.stack(self._rows).cpu().tolist()
        first = self.first_step
        self.first_step += len(rows)
        self._rows = []
        for offset, (loss, coding, _) in enumerate(rows):
            if not (math.isfinite(loss) and math.isfinite(coding)):
                step = first + offset
                raise NonFiniteLossError(
                    f"the loss is {loss} at step {step + 1} (epoch {step // steps_per_epoch + 1}, "
                    f"step {step % steps_per_epoch + 1} of {steps_per_epoch}); training stopped, and "
                    f"checkpoint_last.pt holds the last good state. {advice}"
                )
        spectral = [r[2] for r in rows if math.isfinite(r[2])]
        return {
            "loss": sum(r[0] for r in rows) / len(rows),
            "coding_length": sum(r[1] for r in rows) / len(rows),
            "spectral_norm": max(spectral) if spectral else math.nan,
        }


@dataclass
class EpochTotals:
    """Running totals of the current epoch, from the summaries of its log windows."""

    steps: int = 0
    loss: float = 0.0
    coding_length: float = 0.0
    spectral_norm: float = -math.inf

    def add(self, summary: dict[str, float], steps: int) -> None:
        self.steps += steps
        self.loss += summary["loss"] * steps
        self.coding_length += summary["coding_length"] * steps
        if math.isfinite(summary["spectral_norm"]):
            self.spectral_norm = max(self.spectral_norm, summary["spectral_norm"])

    def means(self) -> dict[str, float]:
        return {
            "loss": self.loss / self.steps,
            "coding_length": self.coding_length / self.steps,
            "spectral_norm": self.spectral_norm if math.isfinite(self.spectral_norm) else math.nan,
        }

    def state_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "loss": self.loss,
            "coding_length": self.coding_length,
            "spectral_norm": self.spectral_norm,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.steps, self.loss = int(state["steps"]), float(state["loss"])
        self.coding_length, self.spectral_norm = float(state["coding_length"]), float(state["spectral_norm"])
