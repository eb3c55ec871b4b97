"""The suffix of ``--out`` / ``out=`` names the output format; one that names none is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.embedding.outputs import OutputTarget
from mec_hub.errors import InvalidArgumentError


@pytest.mark.parametrize("name", ["n.csv", "feats.NPY", "feats.npz", "run.v2", "feats.parquet.bak", "x.txt"])
def test_a_suffix_that_names_no_format_is_refused(name: str, tmp_path: Path):
    with pytest.raises(InvalidArgumentError) as refused:
        OutputTarget.for_out(tmp_path / name)
    message = str(refused.value)
    assert Path(name).suffix in message and ".npy" in message and ".parquet" in message
    assert refused.value.arguments == ("out",)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "written", "parquet"),
    [("feats.npy", "feats.npy", False), ("feats", "feats.npy", False), (".hidden", ".hidden.npy", False),
     ("a.b/feats", "a.b/feats.npy", False), ("feats.parquet", "feats.parquet", True)],
)  # fmt: skip
def test_the_formats_and_a_name_without_a_suffix(name: str, written: str, parquet: bool, tmp_path: Path):
    target = OutputTarget.for_out(tmp_path / name)
    if parquet:
        assert target.parquet is not None and target.parquet.path == tmp_path / written
    else:
        assert target.parquet is None and target.files.npy == tmp_path / written


def test_the_command_line_refuses_it_as_bad_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    result = CliRunner().invoke(embed_main, ["imgs", "--out", "n.csv", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith("Error: --out n.csv: .csv is not an output format"), result.output
    assert "NAME.npy" in error[0] and "NAME.parquet" in error[0] and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["imgs"]  # no n.csv.npy, nor any hidden file


def test_the_python_api_refuses_it_before_any_work(tiny_weights_dir: Path, photos_dir: Path, tmp_path: Path):
    embedder = mec_hub.Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0)
    with pytest.raises(InvalidArgumentError, match=r"out='.*x\.csv': \.csv is not an output format"):
        embedder.embed_folder(photos_dir, tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []
