"""``mec-hub export --format pt2`` (alias ``export``): a torch.export program, and TorchScript's deprecation.

References: the eager model ``mec_hub.load`` returns, run on the same batches; the program run by
``torch.export.load(FILE).module()`` in a separate, isolated interpreter (``-I``, an empty working
folder) that never imports mec_hub; the file's SHA-256 computed here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.hub import main as hub_main

MODEL = "mec_resnet18_cifar10s"  # the bundled registry model: verified, small (48 px)


def _export(*args: object) -> str:
    result = CliRunner().invoke(hub_main, ["export", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pt2") / "model.pt2"
    _export(MODEL, "--format", "pt2", "--out", out, "--head", "projector")
    return out


def test_the_program_runs_without_mec_hub_and_gives_the_eager_outputs(pt2_file: Path, tmp_path: Path):
    model = mec_hub.load(MODEL, head="projector")
    batches = {n: torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)) for n in (1, 3, 5)}
    with torch.no_grad():
        want = {n: model(x) for n, x in batches.items()}
    torch.save(batches, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        program = torch.export.load({str(pt2_file)!r}).module()
        batches = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save({{n: program(x) for n, x in batches.items()}}, {str(tmp_path / "y.pt")!r})
        assert "mec_hub" not in sys.modules and "timm" not in sys.modules, sorted(sys.modules)
        print("ok")
        """
    )
    # -I: no PYTHONPATH, no user site, no script folder on sys.path; an empty folder to run in.
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path / "empty",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    got = torch.load(tmp_path / "y.pt")
    for n in batches:
        assert got[n].shape == (n, 512)
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)


def test_the_sidecar_is_written_beside_the_program(pt2_file: Path):
    side = json.loads(Path(f"{pt2_file}.json").read_text())
    export = side["export"]
    assert export["format"] == "pt2" and export["file"] == "model.pt2"
    assert export["sha256"] == hashlib.sha256(pt2_file.read_bytes()).hexdigest()
    assert export["head"] == "projector" and export["embed_dim"] == 512
    assert export["input"] == {"name": "images", "shape": ["N", 3, 48, 48]}
    assert export["output"] == {"name": "embedding", "shape": ["N", 512]}
    assert export["opset"] is None and export["max_rel_diff_vs_pytorch"] <= 1e-4
    assert export["source_weights_sha256"] == mec_hub.load(MODEL, head="projector").weights_sha256
    bundled = Path(mec_hub.__file__).parent / "bundled" / MODEL / "config.json"
    assert side["pretrained_cfg"] == json.loads(bundled.read_text())["pretrained_cfg"]
    assert not list(pt2_file.parent.glob(".*"))  # no temporary file left behind

    from mec_hub.models.export_sidecar import read_export_description

    got = read_export_description(pt2_file)
    assert (got.format, got.head, got.embed_dim, got.version) == ("pt2", "projector", 512, 2)


def test_export_is_an_alias_of_pt2(tmp_path: Path):
    out = tmp_path / "alias.pt2"
    output = _export(MODEL, "--format", "export", "--out", out)
    assert "(pt2)" in output and "(N, 3, 48, 48)" in output
    assert json.loads(Path(f"{out}.json").read_text())["export"]["format"] == "pt2"
    program = torch.export.load(str(out)).module()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(program(x), mec_hub.load(MODEL)(x), rtol=1e-5, atol=1e-5)


def test_a_program_that_differs_from_the_model_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The check runs the written file: an exporter that wrote another network is caught."""
    from mec_hub.export import deploy

    real = deploy._export_pt2

    def wrong(module: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
        real(torch.nn.Sequential(module, _Scale(1.01)).eval(), example, out)  # 1% off

    monkeypatch.setattr(deploy, "_export_pt2", wrong)
    out = tmp_path / "bad.pt2"
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "differs from the PyTorch model" in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither FILE nor FILE.json, no temporary file


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_torchscript_is_still_written_with_a_one_line_deprecation_warning(tmp_path: Path):
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "deprecated" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: TorchScript is deprecated") and "pt2" in warning[0]
    assert out.is_file() and json.loads(Path(f"{out}.json").read_text())["export"]["format"] == "torchscript"
    help_text = CliRunner().invoke(hub_main, ["export", "--help"]).output
    assert "deprecated" in help_text and "pt2" in help_text and "torch.export" in help_text
