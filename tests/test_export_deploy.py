"""Deployment exports: ``mec-hub export --format onnx|torchscript`` and ``mec-embed --runtime onnxruntime``.

References: the PyTorch model ``mec_hub.load`` returns, run on the same batch; ONNX Runtime called
directly (not through mec_hub's adapter); ``torch.jit.load`` in a process without mec_hub; the
folder's own ``config.json``; the file's SHA-256 computed here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.cli.hub import main as hub_main
from mec_hub.embedding.engine import Embedder
from mec_hub.embedding.job import EmbeddingInterrupted
from mec_hub.errors import MecHubError

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'mec-hub[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra (pip install 'mec-hub[onnx]')")

MODEL = "mec_resnet18_cifar10s"  # the bundled registry model: verified, small (48 px)


def _export(*args: object) -> None:
    result = CliRunner().invoke(hub_main, ["export", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    _export(MODEL, "--format", "onnx", "--out", out, "--dynamic-batch")
    return out


def test_onnx_runtime_matches_pytorch_for_two_batch_sizes(onnx_file: Path):
    model = mec_hub.load(MODEL)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for n in (1, 5):
        x = _batch(n, seed=n)
        with torch.no_grad():
            want = model(x).double().numpy()
        (got,) = session.run(None, {"images": x.numpy()})
        assert got.shape == (n, 224)
        assert _max_rel(got, want) < 1e-4


def test_the_preprocessing_and_digest_are_written_beside_the_file(onnx_file: Path):
    side = json.loads(Path(f"{onnx_file}.json").read_text())
    bundled = Path(mec_hub.__file__).parent / "bundled" / MODEL / "config.json"
    assert side["pretrained_cfg"] == json.loads(bundled.read_text())["pretrained_cfg"]
    export = side["export"]
    assert export["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert export["format"] == "onnx" and export["head"] == "backbone" and export["embed_dim"] == 224
    assert export["input"] == {"name": "images", "shape": ["N", 3, 48, 48]} and export["opset"] == 18
    assert export["source_weights_sha256"] == mec_hub.load(MODEL).weights_sha256
    assert not list(onnx_file.parent.glob(".*"))  # no temporary file left behind


def test_fixed_batch_onnx_export_and_the_adapter_slices_batches(tmp_path: Path):
    import onnx

    out = tmp_path / "proj.onnx"
    _export(MODEL, "--format", "onnx", "--out", out, "--head", "projector", "--opset", "20")
    graph = onnx.load(str(out))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 48]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 20
    from mec_hub.export.deploy import OnnxRuntimeModel

    adapter = OnnxRuntimeModel(out)
    model = mec_hub.load(MODEL, head="projector")
    x = _batch(3)
    with torch.no_grad():
        want = model(x).double().numpy()
    got = adapter(x).numpy()
    assert adapter.head == "projector" and got.shape == (3, 512) and _max_rel(got, want) < 1e-4


def test_torchscript_is_bit_equal_and_loads_without_mec_hub(tmp_path: Path):
    out = tmp_path / "model.pt"
    _export(MODEL, "--format", "torchscript", "--out", out, "--head", "projector")
    model = mec_hub.load(MODEL, head="projector")
    x = _batch(4)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(torch.jit.load(str(out))(x), want)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        model = torch.jit.load({str(out)!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("mec_hub", "timm")))
        """
    )
    # Run from an empty folder, so that nothing of the repository is importable by accident.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)


def test_mec_embed_with_onnxruntime_gives_the_pytorch_rows_and_resumes(onnx_file: Path, tmp_path: Path):
    from embed_support import make_images

    images = tmp_path / "imgs"
    make_images(images, 11)
    torch_out, ort_out = tmp_path / "torch.npy", tmp_path / "ort.npy"
    common = [str(images), "-j", "0", "-b", "4", "--device", "cpu", "-q"]
    done = CliRunner().invoke(embed_main, [*common, "--out", str(torch_out), "--model", MODEL])
    assert done.exit_code == 0, done.output

    def stop(progress):
        raise KeyboardInterrupt

    embedder = Embedder(runtime="onnxruntime", weights=onnx_file, device="cpu", num_workers=0, batch_size=4)
    with pytest.raises(EmbeddingInterrupted):
        embedder.embed_folder(images, ort_out, on_commit=stop)
    resumed = CliRunner().invoke(
        embed_main,
        [*common, "--out", str(ort_out), "--runtime", "onnxruntime", "--weights", str(onnx_file), "--resume"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert ort_out.with_name("ort.paths.txt").read_text() == torch_out.with_name("torch.paths.txt").read_text()
    got, want = np.load(ort_out), np.load(torch_out)
    assert got.shape == want.shape == (11, 224)
    assert _max_rel(got, want.astype(np.float64)) < 1e-4
    meta = json.loads(ort_out.with_name("ort.meta.json").read_text())
    assert meta["runtime"] == "onnxruntime" and meta["weights"] == str(onnx_file.resolve())
    assert meta["weights_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert meta["optimizations"] == []
    # mec-hub search rebuilds the same runtime from the meta file.
    rebuilt = Embedder.from_meta(ort_out.with_name("ort.meta.json"), device="cpu", num_workers=0)
    assert rebuilt.identity()["runtime"] == "onnxruntime"


def test_a_changed_onnx_file_is_refused(onnx_file: Path, tmp_path: Path):
    copy = tmp_path / "m.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-5] ^= 1
    copy.write_bytes(bytes(data))
    Path(f"{copy}.json").write_text(Path(f"{onnx_file}.json").read_text())
    (tmp_path / "imgs").mkdir()
    result = CliRunner().invoke(
        embed_main,
        [str(tmp_path / "imgs"), "--out", str(tmp_path / "f.npy"), "--runtime", "onnxruntime", "--weights", str(copy)],
    )
    assert result.exit_code == 1 and "SHA-256 mismatch for" in result.output and "Traceback" not in result.output


def test_usage_errors(tmp_path: Path, onnx_file: Path):
    runner = CliRunner()
    old_opset = runner.invoke(
        hub_main, ["export", MODEL, "--format", "onnx", "--out", str(tmp_path / "a.onnx"), "--opset", "17"]
    )
    assert old_opset.exit_code == 1 and "opset 18 or newer" in old_opset.output
    script_opset = runner.invoke(
        hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(tmp_path / "a.pt"), "--opset", "18"]
    )
    assert script_opset.exit_code == 1 and "ONNX exports only" in script_opset.output
    existing = runner.invoke(hub_main, ["export", MODEL, "--format", "onnx", "--out", str(onnx_file)])
    assert existing.exit_code == 1 and "--overwrite" in existing.output
    with_model = runner.invoke(
        embed_main, [str(tmp_path), "--out", str(tmp_path / "f.npy"), "--runtime", "onnxruntime", "--model", MODEL]
    )
    assert with_model.exit_code == 2 and "--weights" in with_model.output


def test_missing_onnx_packages_are_one_line(tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: find_spec answers None
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "onnx", "--out", str(tmp_path / "a.onnx")])
    assert result.exit_code == 1 and "pip install 'mec-hub[onnx]'" in result.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MecHubError, match=r"pip install 'mec-hub\[onnx\]'"):
        Embedder(runtime="onnxruntime", weights=onnx_file, device="cpu")
