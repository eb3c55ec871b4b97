"""``mec-hub plot``: a picture from a metrics file, tolerant of bad lines, and a clear message without matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from mec_hub.apps.plots import PANELS, read_metrics, series
from mec_hub.cli.hub import main


def write_metrics(path: Path) -> Path:
    lines = []
    for step in range(0, 60, 10):
        record = {
            "step": step,
            "epoch": step // 20,
            "loss": -10.0 - step / 10,
            "coding_length": 50 + step,
            "lr": 0.01 * step,
            "lamda": 1 / (8 - step / 10),
            "teacher_momentum": 0.996 + step / 1e5,
        }
        if step % 20 == 0:
            record["knn_top1"] = 10.0 + step
        lines.append(json.dumps(record))
    lines.insert(2, "")
    lines.insert(4, '{"step": 25, "loss": -1')  # a run killed mid-write
    lines.append('{"step": 60, "loss": NaN}')  # json accepts it; the plot leaves it out
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_writes_a_png(tmp_path: Path):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(metrics), "--out", str(out), "--dpi", 50])
    assert result.exit_code == 0, result.output
    # The command shows warnings as one "Warning: ..." line each, on stderr.
    assert f"Warning: {metrics}:3: blank line, skipped" in result.stderr
    assert f"Warning: {metrics}:5: not valid JSON, skipped" in result.stderr
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (15 * 50, 8 * 50)
    assert not list(tmp_path.glob(".curves.png.*"))  # no temporary file left behind


def test_series_tolerates_missing_fields(tmp_path: Path):
    with pytest.warns(UserWarning):
        records = read_metrics(write_metrics(tmp_path / "metrics.jsonl"))
    by_title = {panel.title: panel for panel in PANELS}
    steps, values, name = series(records, by_title["kNN top-1"])
    assert (steps, values, name) == ([0.0, 20.0, 40.0], [10.0, 30.0, 50.0], "knn_top1")
    steps, values, name = series(records, by_title["1/λ (λ warm-up)"])
    assert name == "lamda" and values == pytest.approx([8 - s / 10 for s in steps]) and len(steps) == 6
    assert series(records, by_title["Loss"])[0] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]  # NaN left out
    assert series([{"loss": 1.0}], by_title["Teacher momentum"]) == ([], [], None)


def test_plot_errors(tmp_path: Path):
    missing = CliRunner().invoke(main, ["plot", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a.png")])
    assert missing.exit_code == 1 and "metrics file not found" in missing.output
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("not json\n")
    empty = CliRunner().invoke(main, ["plot", str(garbled), "--out", str(tmp_path / "a.png")])
    assert empty.exit_code == 1 and "no metrics to plot" in empty.stderr


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = CliRunner().invoke(main, ["plot", str(metrics), "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 1
    assert result.output.strip() == 'Error: plotting needs matplotlib, an optional extra: pip install "mec-hub[plot]"'
    assert not (tmp_path / "a.png").exists()


def test_epoch_summaries_do_not_double_the_step_curves():
    records = [
        {"kind": "step", "step": 10, "loss": -1.0, "images_per_s": 100.0},
        {"kind": "step", "step": 20, "loss": -2.0, "images_per_s": 110.0},
        {"kind": "epoch", "step": 20, "loss": -1.5, "images_per_s": 105.0, "knn_top1": 42.0},
    ]
    by_title = {panel.title: panel for panel in PANELS}
    assert series(records, by_title["Throughput"]) == ([10.0, 20.0], [100.0, 110.0], "images_per_s")
    assert series(records, by_title["kNN top-1"]) == ([20.0], [42.0], "knn_top1")


def test_plot_draws_every_series_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The picture's panels hold the file's numbers, as lines with visible pixels (not empty frames)."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    steps = [0, 10, 20, 30, 40]
    per_step = {
        "loss": [-10.0, -11.5, -12.0, -12.2, -12.3],
        "coding_length": [50.0, 54.0, 57.0, 58.5, 59.0],
        "spectral_norm": [0.4, 0.7, 1.3, 0.9, 0.8],
        "lr": [0.0, 0.05, 0.1, 0.08, 0.04],
        "lamda": [0.5, 0.25, 0.2, 0.125, 0.1],  # drawn as 1/lamda
        "teacher_momentum": [0.996, 0.997, 0.998, 0.999, 1.0],
        "images_per_s": [100.0, 180.0, 150.0, 170.0, 160.0],
        "taylor_rel_error": [1e-6, 1e-4, 0.02, 0.004, 0.003],
    }
    epochs = {20: 31.0, 40: 47.5}  # kNN top-1, measured at the end of each epoch
    lines = []
    for i, step in enumerate(steps):
        lines.append(json.dumps({"kind": "step", "step": step, **{key: values[i] for key, values in per_step.items()}}))
        if step in epochs:  # the epoch summary repeats a loss; the loss curve must not draw it twice
            lines.append(json.dumps({"kind": "epoch", "step": step, "loss": -99.0, "knn_top1": epochs[step]}))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    xs = [float(s) for s in steps]
    expected = {  # panel title: (x, y) of its curve
        "Loss": (xs, per_step["loss"]),
        "Coding length": (xs, per_step["coding_length"]),
        "kNN top-1": ([20.0, 40.0], [31.0, 47.5]),
        "‖C‖₂ (series limit 1)": (xs, per_step["spectral_norm"]),
        "Taylor error vs exact logdet (0.5% line)": (xs, per_step["taylor_rel_error"]),
        "Learning rate": (xs, per_step["lr"]),
        "1/λ (λ warm-up)": (xs, [2.0, 4.0, 5.0, 8.0, 10.0]),
        "Teacher momentum": (xs, per_step["teacher_momentum"]),
        "Throughput": (xs, per_step["images_per_s"]),
    }

    drawn: list[Figure] = []
    savefig = Figure.savefig

    def recording_savefig(self: Figure, *args: object, **kwargs: object) -> object:
        drawn.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(metrics), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (figure,) = drawn
    panels = {ax.get_title().split("  [")[0]: ax for ax in figure.axes}
    assert list(panels) == list(expected)

    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    height = pixels.shape[0]
    for title, ax in panels.items():
        data = [line for line in ax.get_lines() if line.get_linestyle() not in ("--", ":")]
        assert len(data) == 1, (title, data)
        x, y = expected[title]
        assert list(data[0].get_xdata()) == x, title
        assert list(data[0].get_ydata()) == pytest.approx(y), title
        # The line shows in this panel's part of the picture: pixels of its hue (blue, where the
        # frame, grid and text are grey and the limit red) inside the axes box.
        assert to_rgb(data[0].get_color())[2] > to_rgb(data[0].get_color())[0] + 0.3
        box = ax.get_window_extent()
        inside = pixels[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]
        assert (inside[..., 2] - inside[..., 0] > 60).sum() > 50, title
    limit = [line for line in panels["‖C‖₂ (series limit 1)"].get_lines() if line.get_linestyle() == "--"]
    assert len(limit) == 1 and list(limit[0].get_ydata()) == [1.0, 1.0]  # the series' convergence limit
    taylor = panels["Taylor error vs exact logdet (0.5% line)"]
    assert taylor.get_yscale() == "log"  # errors from 1e-6 to 2e-2 on one axis
    limit = [line for line in taylor.get_lines() if line.get_linestyle() == "--"]
    assert len(limit) == 1 and list(limit[0].get_ydata()) == [0.005, 0.005]  # the paper's 0.5%


def draw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str]):
    """Run ``mec-hub plot`` on ``lines``; the CLI result and the figure it drew."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    savefig = Figure.savefig

    def recording_savefig(self: Figure, *args: object, **kwargs: object) -> object:
        drawn.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["plot", str(metrics), "--out", str(tmp_path / "curves.png"), "--dpi", 40])
    return result, drawn[0] if drawn else None


def test_every_panel_names_its_quantity_and_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result, figure = draw(tmp_path, monkeypatch, [json.dumps({"kind": "step", "step": 1, "loss": -1.0})])
    assert result.exit_code == 0, result.output
    assert len(figure.axes) == len(PANELS)
    for ax in figure.axes:
        label = ax.get_ylabel()
        # "quantity (unit)", the unit in parentheses at the end
        assert label.endswith(")") and "(" in label and label.index("(") > 2, (ax.get_title(), label)
    units = {ax.get_title().split("  [")[0]: ax.get_ylabel() for ax in figure.axes}
    assert units["Throughput"].endswith("(images/s)") and units["kNN top-1"].endswith("(%)")


def test_a_resumed_run_is_marked_on_every_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``{"kind": "resume", "step": 20}`` (what training/metrics.py writes on resuming) -> a dotted line at 20."""
    lines = [json.dumps({"kind": "step", "step": s, "loss": -s / 10, "lr": 0.1}) for s in (10, 20, 30, 40)]
    lines.insert(2, json.dumps({"kind": "resume", "step": 20, "time": "2026-01-01T00:00:00+00:00"}))
    lines.append(json.dumps({"kind": "resume", "step": 40, "time": "2026-01-02T00:00:00+00:00"}))
    result, figure = draw(tmp_path, monkeypatch, lines)
    assert result.exit_code == 0, result.output
    for ax in figure.axes:
        markers = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert sorted(list(line.get_xdata()) for line in markers) == [[20.0, 20.0], [40.0, 40.0]], ax.get_title()
    texts = [t.get_text().strip() for ax in figure.axes for t in ax.texts]
    assert texts.count("resumed") == 2  # labelled once per resume, on the first panel
    loss = next(ax for ax in figure.axes if ax.get_title().startswith("Loss"))
    (curve,) = [line for line in loss.get_lines() if line.get_linestyle() not in ("--", ":")]
    assert list(curve.get_xdata()) == [10.0, 20.0, 30.0, 40.0]  # the resume lines add no data points


def test_numbers_no_plot_can_hold_are_left_out_with_a_warning_naming_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``1e400`` (JSON reads inf), ``-1e400``, ``NaN`` and ``1e308`` (its axis range overflows): no traceback."""
    lines = [
        '{"step": 1, "loss": -1.0, "coding_length": 5.0}',
        '{"step": 2, "loss": 1e400, "coding_length": 6.0}',
        '{"step": 3, "loss": -3.0, "coding_length": 1e308}',
        '{"step": 4, "loss": -4.0, "coding_length": -1e400}',
        '{"step": 1e400, "loss": -5.0}',
        '{"step": 6, "loss": NaN, "coding_length": 7.0}',
    ]
    result, figure = draw(tmp_path, monkeypatch, lines)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    metrics = tmp_path / "metrics.jsonl"
    warned = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warned == [
        f"Warning: {metrics}:2: loss is inf, not a plottable number; left out",
        f"Warning: {metrics}:3: coding_length is 1e+308, not a plottable number; left out",
        f"Warning: {metrics}:4: coding_length is -inf, not a plottable number; left out",
        f"Warning: {metrics}:5: step is inf, not a plottable number; line skipped",
        f"Warning: {metrics}:6: loss is nan, not a plottable number; left out",
    ]
    panels = {ax.get_title().split("  [")[0]: ax for ax in figure.axes}
    (loss,) = [line for line in panels["Loss"].get_lines() if line.get_linestyle() not in ("--", ":")]
    assert list(loss.get_xdata()) == [1.0, 3.0, 4.0] and list(loss.get_ydata()) == [-1.0, -3.0, -4.0]
    (coding,) = [line for line in panels["Coding length"].get_lines() if line.get_linestyle() not in ("--", ":")]
    assert list(coding.get_xdata()) == [1.0, 2.0, 6.0] and list(coding.get_ydata()) == [5.0, 6.0, 7.0]


def test_the_taylor_panel_draws_the_value_and_gradient_errors_and_marks_undefined_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As ``training/pretrain.py`` writes them: NaN errors as null; the epoch summaries repeat the windows."""
    windows = [  # step, value error, gradient error, measured steps, undefined steps
        (10, 1e-5, 2e-4, 1, 0),
        (20, 4e-4, 6e-3, 2, 1),  # one of two steps undefined: the defined one's errors
        (30, None, None, 1, 1),  # undefined on its only measured step
        (40, 2e-3, 3e-2, 1, 0),
    ]
    lines = [json.dumps({"kind": "step", "step": 5, "loss": -1.0})]  # measured nothing
    for step, value, grad, measured, undefined in windows:
        lines.append(json.dumps({
            "kind": "step", "step": step, "loss": -step / 10, "taylor_rel_error": value,
            "taylor_grad_rel_error": grad, "spectral_norm_exact": 0.5, "taylor_measured_steps": measured,
            "taylor_undefined_steps": undefined,
        }))  # fmt: skip
    lines.append(json.dumps({"kind": "epoch", "step": 40, "taylor_rel_error": 2e-3, "taylor_grad_rel_error": 3e-2,
                             "taylor_measured_steps": 5, "taylor_undefined_steps": 2}))  # fmt: skip
    result, figure = draw(tmp_path, monkeypatch, lines)
    assert result.exit_code == 0, result.output
    (taylor,) = [ax for ax in figure.axes if ax.get_title().startswith("Taylor error")]
    curves = {line.get_label(): line for line in taylor.get_lines() if line.get_linestyle() not in ("--", ":", "None")}
    assert sorted(curves) == ["gradient (‖·‖_F)", "value"]
    defined = [w for w in windows if w[1] is not None]
    for label, column in (("value", 1), ("gradient (‖·‖_F)", 2)):
        assert list(curves[label].get_xdata()) == [float(w[0]) for w in defined], label
        assert list(curves[label].get_ydata()) == pytest.approx([w[column] for w in defined]), label
    assert curves["value"].get_color() != curves["gradient (‖·‖_F)"].get_color()
    (marks,) = [line for line in taylor.get_lines() if line.get_linestyle() == "None"]
    assert marks.get_label() == "undefined (det(I+C) <= 0)"
    assert list(marks.get_xdata()) == [20.0, 30.0]  # the windows with undefined steps, not the epoch
    assert list(marks.get_ydata()) == [1.0, 1.0] and marks.get_transform() == taylor.get_xaxis_transform()  # top
    legend = [text.get_text() for text in taylor.get_legend().get_texts()]
    assert legend == ["value", "gradient (‖·‖_F)", "undefined (det(I+C) <= 0)"]
    assert taylor.get_yscale() == "log"
    limit = [line for line in taylor.get_lines() if line.get_linestyle() == "--"]
    assert len(limit) == 1 and list(limit[0].get_ydata()) == [0.005, 0.005]


def test_a_run_whose_measured_windows_were_all_undefined_still_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    lines = [json.dumps({"kind": "step", "step": s, "loss": -1.0, "taylor_rel_error": None,
                         "taylor_measured_steps": 1, "taylor_undefined_steps": 1}) for s in (10, 20)]  # fmt: skip
    result, figure = draw(tmp_path, monkeypatch, lines)
    assert result.exit_code == 0, result.output
    (taylor,) = [ax for ax in figure.axes if ax.get_title().startswith("Taylor error")]
    assert not [t for t in taylor.texts if t.get_text() == "not recorded"]
    (marks,) = [line for line in taylor.get_lines() if line.get_linestyle() == "None"]
    assert list(marks.get_xdata()) == [10.0, 20.0]
