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
        record = {"step": step, "epoch": step // 20, "loss": -10.0 - step / 10, "coding_length": 50 + step,
                  "lr": 0.01 * step, "lamda": 1 / (8 - step / 10), "teacher_momentum": 0.996 + step / 1e5}
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
