"""One MEC training step, and the per-step statistics a run logs without syncing every step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mec_hub.models.losses import MECLoss, MECLossOutput, coding_length
from mec_hub.runtime.devices import Precision
from training.schedules import ScheduleValues


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before anything is saved."""


class TaylorFidelity(NamedTuple):
    """How well the truncated series stood for the log-determinant on one step's matrices (float64).

    All fields are 0-d tensors, left on the device. On an undefined step (``defined`` false) both
    errors are NaN.
    """

    rel_error: Tensor
    """``|series - exact| / |exact|`` of the step's coding length (both pairs summed)."""
    spectral_norm: Tensor
    """Exact ``||C||_2``, ``C = lamda * a b^T`` on the L2-normalised rows, the larger of the two pairs."""
    grad_rel_error: Tensor
    """``||g_series - g_exact||_F / ||g_exact||_F``, ``g`` the gradient of that sum w.r.t. the student's rows."""
    defined: Tensor
    """Bool: the exact log-determinant and its gradient were finite (``det(I + C) > 0``, finite inputs)."""


class StepOutput(NamedTuple):
    """:class:`MECLossOutput`'s fields, and the Taylor fidelity on the steps that measure it."""

    loss: Tensor
    coding_length: Tensor
    spectral_norm: Tensor
    fidelity: TaylorFidelity | None = None


def _exact_spectral_norm(a: Tensor, b: Tensor, lamda: float) -> Tensor:
    """``lamda * sigma_max(a' b'^T)``, primes for unit rows, from the smaller side (float64 in, float64 out).

    For m > d, with ``a' = Q_a R_a`` and ``b' = Q_b R_b`` (reduced QR, ``R`` d x d),
    ``a' b'^T = Q_a (R_a R_b^T) Q_b^T`` has the singular values of ``R_a R_b^T``.
    """
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if a.shape[0] > a.shape[1]:
        a, b = torch.linalg.qr(a).R, torch.linalg.qr(b).R
    product = a @ b.mT
    # sigma_max^2 is the top eigenvalue of the symmetric product @ product^T (eigvalsh: several times
    # faster than an SVD on CPU, and float64 keeps sigma^2 exact enough down to sigma ~ 1e-6).
    return torch.linalg.eigvalsh(product @ product.mT)[-1].clamp_min(0).sqrt() * lamda


def taylor_fidelity(pairs: Sequence[tuple[Tensor, Tensor]], lamda: float, order: int) -> TaylorFidelity:
    """The order-``order`` series against the exact log-determinant on the loss's pairs, in float64.

    ``pairs``: the ``(z, p)`` pairs the loss codes (``(z2, p1)`` and ``(z1, p2)``), each ``(m, d)``
    over the global batch; ``z`` is the teacher's side, ``p`` the student's (the one trained). The
    value's relative error is that of the sum over the pairs, the quantity the loss is proportional
    to; the gradient's is that of the gradient of the same sum w.r.t. all the pairs' ``p`` (each its
    own variable, stacked into one vector), through the row normalisation. Both come from autograd
    on detached float64 copies, so the step's own graph is untouched.

    The step is undefined (``defined`` false, both errors NaN) when the exact value or its gradient
    is not finite: ``det(I + C) <= 0`` (far outside the series' region) or inputs holding NaN/inf
    (then the spectral norm is NaN too). It raises on neither.
    """
    if not pairs:
        raise ValueError("taylor_fidelity: no pairs")
    parts = []  # per pair: series, exact, ||g_series - g_exact||^2, ||g_exact||^2, exact norm, finite inputs
    for z, p in pairs:
        z, p = z.detach().double(), p.detach().double()
        finite = torch.isfinite(z).all() & torch.isfinite(p).all()
        # Zeros stand in for non-finite inputs: the step is undefined either way, and eigvalsh would raise on NaN.
        z, p = (torch.where(finite, t, torch.zeros_like(t)) for t in (z, p))
        with torch.enable_grad():
            p.requires_grad_(True)
            s = coding_length(z, p, lamda, order=order, check_finite=False)
            e = coding_length(z, p, lamda, order=None, check_finite=False)
            (g_series,) = torch.autograd.grad(s, p)
            (g_exact,) = torch.autograd.grad(e, p)
        n = torch.where(finite, _exact_spectral_norm(z, p.detach(), lamda), math.nan)
        parts.append((s.detach(), e.detach(), (g_series - g_exact).square().sum(), g_exact.square().sum(), n, finite))
    columns = [torch.stack(column) for column in zip(*parts, strict=True)]
    series, exact, grad_diff_sq, grad_exact_sq = (column.sum() for column in columns[:4])
    norm, finite_inputs = columns[4].max(), columns[5].all()
    defined = finite_inputs & torch.isfinite(exact) & torch.isfinite(grad_exact_sq)
    defined = defined & torch.isfinite(series) & torch.isfinite(grad_diff_sq)
    rel_error = torch.where(defined, (series - exact).abs() / exact.abs(), math.nan)
    grad_rel_error = torch.where(defined, (grad_diff_sq / grad_exact_sq).sqrt(), math.nan)
    return TaylorFidelity(rel_error, norm, grad_rel_error, defined)


def _gather_detached(criterion: MECLoss, tensors: Sequence[Tensor]) -> list[Tensor]:
    """All ranks' rows, in rank order, when the loss is computed on the global batch; no gradient."""
    dist = torch.distributed
    if not (criterion.gather_distributed and dist.is_initialized() and dist.get_world_size() > 1):
        return [t.detach() for t in tensors]
    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.detach().contiguous())
        gathered.append(torch.cat(parts))
    return gathered


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
    fidelity: bool = False,
) -> StepOutput:
    """Forward both views, the symmetric MEC loss, one optimizer step, then the teacher's EMA step.

    ``estimate_norm``: whether the loss estimates ``||C||_2`` this step (only logged steps need it).
    ``fidelity``: also measure the Taylor series against the exact log-determinant on this step's
    matrices (:func:`taylor_fidelity`; a collective under DDP, so every rank must ask on the same
    steps). Ignored when the loss is the exact log-determinant.

    With a GradScaler (fp16), a step whose gradients hold inf/NaN is skipped by the scaler, and
    then the teacher is not updated either: the EMA follows optimizer steps, not batches.
    """
    for group in optimizer.param_groups:
        group["lr"] = values.lr
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        p1, p2, z1, z2 = model(*views)
    out = criterion(p1, z1, p2, z2, lamda_inv=values.lamda_inv, estimate_norm=estimate_norm)
    measured = None
    if fidelity and criterion.order is not None:
        g_p1, g_z1, g_p2, g_z2 = _gather_detached(criterion, (p1, z1, p2, z2))
        measured = taylor_fidelity([(g_z2, g_p1), (g_z1, g_p2)], 1.0 / values.lamda_inv, criterion.order)
    stepped = True
    if scaler is not None:
        scaler.scale(out.loss).backward()
        # update() lowers the scale exactly when step() skipped the step for inf/NaN gradients. step()
        # already syncs with the device to find them, so reading the scale adds no stall of its own.
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale
    else:
        out.loss.backward()
        optimizer.step()
    if stepped:
        update_teacher(values.teacher_momentum)
    return StepOutput(out.loss, out.coding_length, out.spectral_norm, measured)


# The columns of StepStats' rows. On a step that does not measure the fidelity the Taylor errors and
# the exact norm are NaN and the two flags 0; a measured step has taylor_measured 1, and taylor_undefined 1
# when the exact log-determinant was undefined there (then its errors are NaN).
STAT_COLUMNS = (
    "loss",
    "coding_length",
    "spectral_norm",
    "taylor_rel_error",
    "spectral_norm_exact",
    "taylor_grad_rel_error",
    "taylor_measured",
    "taylor_undefined",
)
_REL, _NORM, _GRAD, _MEASURED, _UNDEFINED = range(3, len(STAT_COLUMNS))  # the Taylor columns' indices


def _upgrade_rows(rows: Tensor) -> Tensor:
    """Rows of a checkpoint written with fewer columns, completed to ``STAT_COLUMNS``.

    The first 3 columns were always there, the next 2 came with the value's error. Before the
    explicit flags, a step had measured the fidelity when its exact norm was finite, and it was
    undefined when its error was not; the gradient's error was not measured (NaN).
    """
    missing = len(STAT_COLUMNS) - rows.shape[1]
    if missing <= 0:
        return rows
    nan = torch.full((rows.shape[0], max(0, _MEASURED - rows.shape[1])), math.nan, dtype=rows.dtype)
    rows = torch.cat([rows, nan], dim=1)
    measured = torch.isfinite(rows[:, _NORM])
    undefined = measured & ~torch.isfinite(rows[:, _REL])
    return torch.cat([rows, measured[:, None].to(rows.dtype), undefined[:, None].to(rows.dtype)], dim=1)


@dataclass
class StepStats:
    """Per-step loss statistics kept on the device and read back in one transfer per log.

    ``flush`` raises :class:`NonFiniteLossError` naming the first bad step.
    """

    first_step: int = 0
    _rows: list[Tensor] = field(default_factory=list)

    def add(self, out: StepOutput | MECLossOutput) -> None:
        fidelity = out.fidelity if isinstance(out, StepOutput) else None
        values = [out.loss.detach().float(), out.coding_length.float(), out.spectral_norm.float()]
        nan, zero = torch.full_like(values[0], math.nan), torch.zeros_like(values[0])
        if fidelity is None:
            values += [nan, nan, nan, zero, zero]
        else:
            values += [fidelity.rel_error.to(values[0]), fidelity.spectral_norm.to(values[0])]
            values += [fidelity.grad_rel_error.to(values[0]), torch.ones_like(zero), (~fidelity.defined).to(zero)]
        self._rows.append(torch.stack(values))

    def __len__(self) -> int:
        return len(self._rows)

    def state_dict(self) -> dict[str, object]:
        rows = torch.stack(self._rows).cpu() if self._rows else torch.zeros(0, len(STAT_COLUMNS))
        return {"first_step": self.first_step, "rows": rows}

    def load_state_dict(self, state: dict[str, object], device: torch.device | str = "cpu") -> None:
        self.first_step = int(state["first_step"])  # type: ignore[arg-type]
        rows = _upgrade_rows(state["rows"])  # type: ignore[arg-type]
        self._rows = [row.to(device) for row in rows]

    def check_finite(self, *, steps_per_epoch: int, advice: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if a step since the last flush had a NaN/inf loss (one sync)."""
        if self._rows and not bool(torch.isfinite(torch.stack(self._rows)[:, :2]).all()):
            self.flush(steps_per_epoch=steps_per_epoch, advice=advice)

    def flush(self, *, steps_per_epoch: int, advice: str = "") -> dict[str, float]:
        """Mean loss and coding length, max spectral norm of the steps added since the last flush.

        A window with steps that measured the Taylor fidelity adds ``taylor_measured_steps`` and
        ``taylor_undefined_steps`` (ints: how many measured it, and on how many of those the exact
        log-determinant was undefined), ``taylor_rel_error`` and ``taylor_grad_rel_error`` (the
        largest over the measured steps where it was defined; NaN when it was defined on none) and
        ``spectral_norm_exact`` (the largest over the measured steps).
        """
        if not self._rows:
            return {}
        rows = torch.stack(self._rows).cpu().tolist()
        first = self.first_step
        self.first_step += len(rows)
        self._rows = []
        for offset, (loss, coding, *_) in enumerate(rows):
            if not (math.isfinite(loss) and math.isfinite(coding)):
                step = first + offset
                raise NonFiniteLossError(
                    f"the loss is {loss} at step {step + 1} (epoch {step // steps_per_epoch + 1}, "
                    f"step {step % steps_per_epoch + 1} of {steps_per_epoch}); training stopped, and "
                    f"checkpoint_last.pt holds the last good state. {advice}"
                )
        summary = {
            "loss": sum(r[0] for r in rows) / len(rows),
            "coding_length": sum(r[1] for r in rows) / len(rows),
            "spectral_norm": _max_finite(r[2] for r in rows),
        }
        measured = [r for r in rows if r[_MEASURED] > 0]
        if measured:
            defined = [r for r in measured if not r[_UNDEFINED] > 0]
            summary["taylor_rel_error"] = _max_finite(r[_REL] for r in defined)
            summary["taylor_grad_rel_error"] = _max_finite(r[_GRAD] for r in defined)
            summary["spectral_norm_exact"] = _max_finite(r[_NORM] for r in measured)
            summary["taylor_measured_steps"] = len(measured)
            summary["taylor_undefined_steps"] = len(measured) - len(defined)
        return summary


def _max_finite(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


_TAYLOR_MAXIMA = ("taylor_rel_error", "taylor_grad_rel_error", "spectral_norm_exact")
_TAYLOR_COUNTS = ("taylor_measured_steps", "taylor_undefined_steps")


@dataclass
class EpochTotals:
    """Running totals of the current epoch, from the summaries of its log windows."""

    steps: int = 0
    loss: float = 0.0
    coding_length: float = 0.0
    spectral_norm: float = -math.inf
    taylor_rel_error: float = -math.inf
    spectral_norm_exact: float = -math.inf
    taylor_grad_rel_error: float = -math.inf
    taylor_measured_steps: int = 0
    taylor_undefined_steps: int = 0

    def add(self, summary: dict[str, float], steps: int) -> None:
        self.steps += steps
        self.loss += summary["loss"] * steps
        self.coding_length += summary["coding_length"] * steps
        for key in ("spectral_norm", *_TAYLOR_MAXIMA):
            value = summary.get(key, math.nan)
            if math.isfinite(value):
                setattr(self, key, max(getattr(self, key), value))
        for key in _TAYLOR_COUNTS:
            setattr(self, key, getattr(self, key) + int(summary.get(key, 0)))

    def means(self) -> dict[str, float]:
        """Mean loss and coding length; the largest spectral norm; the Taylor fidelity, where measured.

        The fidelity is the window summaries' (:meth:`StepStats.flush`) over the epoch: the largest
        errors and exact norm, NaN where there was none, and the summed counts.
        """
        means = {
            "loss": self.loss / self.steps,
            "coding_length": self.coding_length / self.steps,
            "spectral_norm": self.spectral_norm if math.isfinite(self.spectral_norm) else math.nan,
        }
        # A finite exact norm with no count: resumed from an epoch state written before the counts.
        if self.taylor_measured_steps > 0 or math.isfinite(self.spectral_norm_exact):
            for key in _TAYLOR_MAXIMA:
                value = getattr(self, key)
                means[key] = value if math.isfinite(value) else math.nan
            for key in _TAYLOR_COUNTS:
                means[key] = getattr(self, key)
        return means

    def state_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.steps, self.loss = int(state["steps"]), float(state["loss"])
        self.coding_length, self.spectral_norm = float(state["coding_length"]), float(state["spectral_norm"])
        for key in _TAYLOR_MAXIMA:  # older states lack the later keys
            setattr(self, key, float(state.get(key, -math.inf)))
        for key in _TAYLOR_COUNTS:
            setattr(self, key, int(state.get(key, 0)))
