"""Training curves from ``metrics.jsonl``: loss, coding length, schedules, kNN top-1 and the Taylor error.

``metrics.jsonl`` holds one JSON object per line (``step``, ``epoch``, ``loss``, ``coding_length``,
``lr``, ``lamda_inv`` or ``lamda``, ``teacher_momentum``, ``knn_top1`` when measured,
``taylor_rel_error``, ``taylor_grad_rel_error`` and ``taylor_undefined_steps`` on the steps that
measured the Taylor fidelity, ...). Any field may be missing from any line;
blank or garbled lines (a run killed mid-write) are skipped with a warning naming the line, and
so are values no plot can hold (NaN, or inf as JSON reads ``1e400``; numbers beyond 1e300). A
``{"kind": "resume", "step": S}`` line (``training/pretrain.py`` writes one when a run is resumed)
is drawn as a dotted vertical line at S on every panel. matplotlib is an optional extra
(``pip install "mec-hub[plot]"``) and is driven through its object API with the Agg canvas, so
no global backend is changed.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mec_hub.errors import MalformedFileError, MecHubError
from mec_hub.fileio import atomic_write, read_json_lines


class MissingExtraError(MecHubError, ImportError):
    """An optional dependency that is not installed."""


# Larger magnitudes overflow matplotlib's axis range (a span of 2e308 is inf): such values are left out.
PLOTTABLE = 1e300


@dataclass(frozen=True)
class Panel:
    title: str
    fields: tuple[str, ...]  # the first field present in a record is used
    ylabel: str  # the quantity and its unit
    log: bool = False
    # A reference level drawn as a dashed line (e.g. where the Taylor series stops converging).
    limit: float | None = None
    # The legend label of the first curve, and more curves on the same axes as (field, label); each is
    # drawn when the records have it.
    label: str | None = None
    more: tuple[tuple[str, str], ...] = ()
    # (count field, label): the steps where the count is > 0 get a marker at the panel's top edge.
    flag: tuple[str, str] | None = None


PANELS = (
    Panel("Loss", ("loss",), "loss (nats/sample × 1/λ)"),
    Panel("Coding length", ("coding_length",), "coding length (nats/sample)"),
    Panel("kNN top-1", ("knn_top1",), "top-1 accuracy (%)"),
    Panel("‖C‖₂ (series limit 1)", ("spectral_norm",), "‖λ z₁z₂ᵀ‖₂ (dimensionless)", limit=1.0),
    # The paper's claim: the order-4 series is within 0.5% of the log-determinant. Its gradient, which
    # is what trains, is further off; windows where the exact value was undefined are marked.
    Panel(
        "Taylor error vs exact logdet (0.5% line)",
        ("taylor_rel_error",),
        "|series − exact| / |exact| (fraction)",
        log=True,
        limit=0.005,
        label="value",
        more=(("taylor_grad_rel_error", "gradient (‖·‖_F)"),),
        flag=("taylor_undefined_steps", "undefined (det(I+C) <= 0)"),
    ),
    Panel("Learning rate", ("lr",), "learning rate (per step)"),
    Panel("1/λ (λ warm-up)", ("lamda_inv", "lambda_inv", "lamda", "lambda"), "1/λ = m·ε²/d (dimensionless)"),
    Panel("Teacher momentum", ("teacher_momentum",), "EMA momentum μ (dimensionless)"),
    Panel("Throughput", ("images_per_s",), "throughput (images/s)"),
)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank, garbled or non-object lines are skipped with a warning.

    So are numbers no plot can hold (NaN, inf, beyond 1e300): the value is left out of its line,
    or the whole line when it is the ``step``, with a warning naming the line and the field.
    """
    path = Path(path)
    try:
        lines = read_json_lines(path)
    except FileNotFoundError:
        raise MecHubError(f"metrics file not found: {path}") from None
    records = []
    for number, record in lines:
        if record is None:
            warnings.warn(f"{path}:{number}: blank line, skipped", stacklevel=2)
            continue
        if isinstance(record, MalformedFileError):
            detail = str(record).removeprefix(f"{path}:{number}: ")
            warnings.warn(f"{path}:{number}: not valid JSON, skipped ({detail})", stacklevel=2)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{number}: not a JSON object, skipped", stacklevel=2)
            continue
        unplottable = [key for key, value in record.items() if _out_of_range(value)]
        if "step" in unplottable:
            warnings.warn(
                f"{path}:{number}: step is {record['step']!r}, not a plottable number; line skipped", stacklevel=2
            )
            continue
        for key in unplottable:
            warnings.warn(
                f"{path}:{number}: {key} is {record.pop(key)!r}, not a plottable number; left out", stacklevel=2
            )
        records.append(record)
    return records


def _out_of_range(value: Any) -> bool:
    return isinstance(value, float) and not (math.isfinite(value) and abs(value) <= PLOTTABLE)


def resume_steps(records: Sequence[dict[str, Any]]) -> list[float]:
    """The steps of the ``{"kind": "resume"}`` lines: where the run was restarted from a checkpoint."""
    steps = (_number(r.get("step")) for r in records if r.get("kind") == "resume")
    return sorted({s for s in steps if s is not None})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and abs(value) <= PLOTTABLE else None


def series(records: Sequence[dict[str, Any]], panel: Panel) -> tuple[list[float], list[float], str | None]:
    """``(steps, values, field)`` of the panel's first field present; lines without a number are left out.

    The x value is ``step`` when the line has one, else the line's position among the records.
    ``training/pretrain.py`` also writes per-epoch summaries (``"kind": "epoch"``) at the same
    steps as its log lines; they are used only for a quantity the log lines lack (kNN top-1).
    """
    name = next((f for f in panel.fields if any(_number(r.get(f)) is not None for r in records)), None)
    if name is None:
        return [], [], None
    steps, values = field_series(records, name)
    return steps, values, name


def field_series(records: Sequence[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one field, as :func:`series` reads it (``lamda`` drawn as ``1/lamda``)."""
    per_step = [r for r in records if r.get("kind") != "epoch"]
    if any(_number(r.get(name)) is not None for r in per_step):
        records = per_step
    steps, values = [], []
    for position, record in enumerate(records):
        value = _number(record.get(name))
        if value is None:
            continue
        if name in ("lamda", "lambda"):
            if value == 0:
                continue
            value = 1.0 / value
        step = _number(record.get("step"))
        steps.append(step if step is not None else float(position))
        values.append(value)
    return steps, values


def _import_matplotlib() -> Any:
    # matplotlib is optional (mec-hub[plot]): imported where a figure is drawn.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError('plotting needs matplotlib, an optional extra: pip install "mec-hub[plot]"') from None
    return Figure, FigureCanvasAgg


def plot_training_curves(
    metrics: str | os.PathLike[str] | Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw the panels of ``PANELS`` from a metrics file (or its records) and write ``out`` atomically.

    The picture is 15 x 8 inches at ``dpi`` (1500 x 800 pixels by default). Every panel's y axis
    names its quantity and unit. A quantity the run did not record gets an empty panel that says
    so; a resumed run has a dotted vertical line at each step it was resumed from.
    """
    figure_cls, canvas_cls = _import_matplotlib()
    if isinstance(metrics, str | os.PathLike):
        title = title or str(metrics)
        records = read_metrics(metrics)
        if not records:
            raise MecHubError(f"{metrics}: no metrics to plot (no valid JSON lines)")
    else:
        records = list(metrics)
        if not records:
            raise MecHubError("no metrics to plot")
    figure = figure_cls(figsize=(15, 8), dpi=dpi, layout="constrained")
    canvas = canvas_cls(figure)
    image_format = Path(out).suffix.lower().lstrip(".") or "png"
    if image_format not in canvas.get_supported_filetypes():
        known = ", ".join(sorted(canvas.get_supported_filetypes()))
        raise MecHubError(f"{out}: cannot tell the picture format from the name; use one of: {known}")
    axes = figure.subplots(3, 3, sharex=True)  # one step axis, so that events line up across panels
    bottom_row = set(axes[-1])
    resumes = resume_steps(records)
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        steps, values, name = series(records, panel)
        ax.set_title(panel.title if name is None else f"{panel.title}  [{name}]", fontsize="medium")
        if ax in bottom_row:
            ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel, fontsize="small")
        ax.grid(True, alpha=0.3)
        for step in resumes:
            ax.axvline(step, color="tab:green", linestyle=":", linewidth=1.2)
            if ax is axes.flat[0]:
                ax.text(step, 0.98, " resumed", transform=ax.get_xaxis_transform(), rotation=90,
                        va="top", ha="left", fontsize="x-small", color="tab:green")  # fmt: skip
        # (steps, values, label, colour): the first field present, then the panel's further curves
        curves = [(steps, values, panel.label, "C0")] if name is not None else []
        for number, (field, label) in enumerate(panel.more, start=1):
            curves.append((*field_series(records, field), label, f"C{number}"))
        curves = [curve for curve in curves if curve[1]]
        flagged = []
        if panel.flag is not None:
            flagged = [x for x, count in zip(*field_series(records, panel.flag[0]), strict=True) if count > 0]
        if not curves and not flagged:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for xs, ys, label, colour in curves:
            marker = "o" if len(ys) <= 50 else None
            ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.2, label=label, color=colour)
        if flagged:  # x in data, y in axes coordinates: on the top edge, whatever the y range
            ax.plot(flagged, [1.0] * len(flagged), transform=ax.get_xaxis_transform(), linestyle="none",
                    marker="v", markersize=6, color="tab:red", clip_on=False, label=panel.flag[1])  # fmt: skip
        drawn = [y for _, ys, _, _ in curves for y in ys]
        if panel.log and drawn and all(y > 0 for y in drawn):
            ax.set_yscale("log")
        if panel.limit is not None:
            ax.axhline(panel.limit, color="tab:red", linestyle="--", linewidth=1)
        if panel.label is not None or flagged:
            ax.legend(fontsize="x-small", loc="lower right")  # "best" is slow and warns on long runs
    if title:
        figure.suptitle(title)
    return atomic_write(out, lambda tmp: figure.savefig(tmp, format=image_format, dpi=dpi))
