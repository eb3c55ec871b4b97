"""Training curves from ``metrics.jsonl``: loss, coding length, schedules and kNN top-1 against steps.

``metrics.jsonl`` holds one JSON object per line (``step``, ``epoch``, ``loss``, ``coding_length``,
``lr``, ``lamda_inv`` or ``lamda``, ``teacher_momentum``, ``knn_top1`` when measured, ...). Any
field may be missing from any line; blank or garbled lines (a run killed mid-write) are skipped
with a warning naming the line. matplotlib is an optional extra (``pip install "mec-hub[plot]"``)
and is driven through its object API with the Agg canvas, so no global backend is changed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mec_hub.errors import MecHubError
from mec_hub.fileio import atomic_write


class MissingExtraError(MecHubError, ImportError):
    """An optional dependency that is not installed."""


@dataclass(frozen=True)
class Panel:
    title: str
    fields: tuple[str, ...]  # the first field present in a record is used
    ylabel: str = ""
    log: bool = False
    # A reference level drawn as a dashed line (e.g. where the Taylor series stops converging).
    limit: float | None = None


PANELS = (
    Panel("Loss", ("loss",)),
    Panel("Coding length", ("coding_length",)),
    Panel("kNN top-1", ("knn_top1",), "%"),
    Panel("‖C‖₂ (series limit 1)", ("spectral_norm",), limit=1.0),
    Panel("Learning rate", ("lr",)),
    Panel("1/λ (λ warm-up)", ("lamda_inv", "lambda_inv", "lamda", "lambda")),
    Panel("Teacher momentum", ("teacher_momentum",)),
    Panel("Throughput", ("images_per_s",), "images/s"),
)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank, garbled or non-object lines are skipped with a warning."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise MecHubError(f"metrics file not found: {path}") from None
    except OSError as exc:
        raise MecHubError(f"{path}: cannot read ({exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            warnings.warn(f"{path}:{number}: blank line, skipped", stacklevel=2)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            shown = line if len(line) <= 60 else line[:57] + "..."
            warnings.warn(f"{path}:{number}: not valid JSON, skipped: {shown}", stacklevel=2)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{number}: not a JSON object, skipped", stacklevel=2)
            continue
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(records: Sequence[dict[str, Any]], panel: Panel) -> tuple[list[float], list[float], str | None]:
    """``(steps, values, field)`` of the panel's first field present; lines without a number are left out.

    The x value is ``step`` when the line has one, else the line's position among the records.
    ``training/pretrain.py`` also writes per-epoch summaries (``"kind": "epoch"``) at the same
    steps as its log lines; they are used only for a quantity the log lines lack (kNN top-1).
    """
    name = next((f for f in panel.fields if any(_number(r.get(f)) is not None for r in records)), None)
    if name is not None:
        per_step = [r for r in records if r.get("kind") != "epoch"]
        if any(_number(r.get(name)) is not None for r in per_step):
            records = per_step
    if name is None:
        return [], [], None
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
    return steps, values, name


def _import_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(
            'plotting needs matplotlib, an optional extra: pip install "mec-hub[plot]"'
        ) from None
    return Figure, FigureCanvasAgg


def plot_training_curves(
    metrics: str | os.PathLike[str] | Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw the panels of ``PANELS`` from a metrics file (or its records) and write ``out`` atomically.

    The picture is 15 x 8 inches at ``dpi`` (1500 x 800 pixels by default). A quantity the run
    did not record gets an empty panel that says so.
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
    axes = figure.subplots(2, 4, sharex=True)  # one step axis, so that events line up across panels
    bottom_row = set(axes[-1])
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        steps, values, name = series(records, panel)
        ax.set_title(panel.title if name is None else f"{panel.title}  [{name}]")
        if ax in bottom_row:
            ax.set_xlabel("step")
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if name is None:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        marker = "o" if len(values) <= 50 else None
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2)
        if panel.limit is not None:
            ax.axhline(panel.limit, color="tab:red", linestyle="--", linewidth=1)
    if title:
        figure.suptitle(title)
    return atomic_write(out, lambda tmp: figure.savefig(tmp, format=image_format, dpi=dpi))
