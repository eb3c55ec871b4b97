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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    from mec_hub.models.onnx_runtime import OnnxRuntimeModel

    adapter = OnnxRuntimeModel(out)
    model = mec_hub.load(MODEL, head="projector")
    x = _batch(3)
    with torch.no_grad():
        want = model(x).double().numpy()
    got = adapter(x).numpy()
    assert adapter.head == "projector" and got.shape == (3, 512) and _max_rel(got, want) < 1e-4


@pytest.mark.slow  # TorchScript is deprecated (pt2 replaces it); kept checked, outside the default suite
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
    from tests.support.embedding import make_images

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
    assert rebuilt.identity.runtime == "onnxruntime"


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
    assert old_opset.exit_code == 2 and "opset 18 or newer" in old_opset.output
    script_opset = runner.invoke(
        hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(tmp_path / "a.pt"), "--opset", "18"]
    )
    assert script_opset.exit_code == 2 and "ONNX exports only" in script_opset.output
    existing = runner.invoke(hub_main, ["export", MODEL, "--format", "onnx", "--out", str(onnx_file)])
    assert existing.exit_code == 1 and "--overwrite" in existing.output
    pooled = runner.invoke(
        embed_main, [str(tmp_path), "--out", str(tmp_path / "f.npy"), "--runtime", "onnxruntime", "--pool", "gem"]
    )
    assert pooled.exit_code == 2 and "no --pool or --layer" in pooled.output
    onnx_with_model = runner.invoke(
        embed_main, [str(tmp_path), "-o", str(tmp_path / "g.npy"), "--weights", str(onnx_file), "--model", MODEL]
    )
    assert onnx_with_model.exit_code == 2 and "no --model" in onnx_with_model.output


def test_missing_onnx_packages_are_one_line(tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: find_spec answers None
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "onnx", "--out", str(tmp_path / "a.onnx")])
    assert result.exit_code == 1 and "pip install 'mec-hub[onnx]'" in result.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MecHubError, match=r"pip install 'mec-hub\[onnx\]'"):
        Embedder(runtime="onnxruntime", weights=onnx_file, device="cpu")


# --------------------------------------------------------------------------- where the export writes


def _no_temporary_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["/proc", "under a file"])
def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path: Path, where: str):
    # As root a read-only folder is writable; /proc and a path under a regular file refuse anyone.
    (tmp_path / "file.txt").write_text("not a folder")
    out = Path("/proc/mec_hub_test.pt") if where == "/proc" else tmp_path / "file.txt" / "model.pt"
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: cannot write {out}: "), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_an_unwritable_sidecar_leaves_the_existing_export_untouched(tmp_path: Path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the export of yesterday")
    Path(f"{out}.json").mkdir()  # FILE.json cannot be written: a folder is in its place
    result = CliRunner().invoke(
        hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(out), "--overwrite"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert f"{out}.json" in result.output and "folder" in result.output
    assert out.read_bytes() == b"the export of yesterday"
    assert _no_temporary_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


def test_an_existing_folder_as_out_is_bad_usage(tmp_path: Path):
    (tmp_path / "folder").mkdir()
    result = CliRunner().invoke(
        hub_main, ["export", MODEL, "--format", "torchscript", "--out", str(tmp_path / "folder"), "--overwrite"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output and "is a directory" in result.output
    assert list((tmp_path / "folder").iterdir()) == [] and _no_temporary_files(tmp_path)


# --------------------------------------------------------------------------- FILE.json, read by the runtime


def _sidecar_with(onnx_file: Path, tmp_path: Path, **export: object) -> Path:
    """A copy of the export whose FILE.json has ``export`` fields replaced (None: removed)."""
    copy = tmp_path / "m.onnx"
    copy.write_bytes(onnx_file.read_bytes())
    description = json.loads(Path(f"{onnx_file}.json").read_text())
    for key, value in export.items():
        if value is None:
            description["export"].pop(key, None)
        else:
            description["export"][key] = value
    Path(f"{copy}.json").write_text(json.dumps(description))
    return copy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embed_dim", "224"),  # a string: int() of it once passed, of "abc" raised ValueError
        ("embed_dim", 0),
        ("sha256", None),  # no digest: the file was once run unchecked
        ("sha256", "abc"),
        ("head", "predictor"),
        ("format", "tflite"),
    ],
)
def test_a_bad_sidecar_field_is_one_error_naming_file_and_field(onnx_file: Path, tmp_path: Path, field, value):
    from mec_hub.models.onnx_runtime import OnnxRuntimeModel

    copy = _sidecar_with(onnx_file, tmp_path, **{field: value})
    with pytest.raises(MecHubError, match=rf"{copy}\.json: export\.{field} is "):
        OnnxRuntimeModel(copy)
    (tmp_path / "imgs").mkdir()
    result = CliRunner().invoke(
        embed_main,
        [str(tmp_path / "imgs"), "--out", str(tmp_path / "f.npy"), "--runtime", "onnxruntime", "--weights", str(copy)],
    )
    assert result.exit_code == 1 and f"export.{field}" in result.output and "Traceback" not in result.output


def test_the_runtime_reads_what_the_export_wrote(onnx_file: Path):
    from mec_hub.models.export_sidecar import read_export_description

    written = json.loads(Path(f"{onnx_file}.json").read_text())  # the file on disk, read here without mec_hub
    got = read_export_description(onnx_file)
    assert got.path == Path(f"{onnx_file}.json") and dict(got.export) == written["export"]
    assert (got.format, got.sha256, got.head, got.embed_dim) == ("onnx", _sha256(onnx_file), "backbone", 224)
    assert got.config.pretrained_cfg["input_size"] == written["pretrained_cfg"]["input_size"] == [3, 48, 48]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_onnx_runtime_model_lives_with_the_models_and_imports_no_export_module():
    script = (
        "import sys; import mec_hub.models.onnx_runtime, mec_hub.models.export_sidecar; "
        "print(sorted(m for m in sys.modules if m.startswith('mec_hub.export')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _valid_sidecar() -> bytes:
    """A FILE.json made here: the bundled model's config.json plus an export section."""
    description = json.loads((Path(mec_hub.__file__).parent / "bundled" / MODEL / "config.json").read_text())
    description["export"] = {
        "format": "onnx",
        "file": "m.onnx",
        "sha256": "ab" * 32,
        "head": "projector",
        "embed_dim": 512,
        "input": {"name": "images", "shape": ["N", 3, 48, 48]},
    }
    return json.dumps(description).encode()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(min_value=0, max_value=4000),
    flip=st.integers(min_value=0, max_value=4000),
    bit=st.integers(min_value=0, max_value=7),
    dim=st.one_of(st.integers(), st.just(512)),
)
def test_the_sidecar_reader_fuzzed_gives_the_fields_or_one_error(tmp_path, memory_cap, cut, flip, bit, dim):
    from mec_hub.models.export_sidecar import MAX_EMBED_DIM, read_export_description

    data = bytearray(_valid_sidecar().replace(b'"embed_dim": 512', b'"embed_dim": %d' % dim))
    data[flip % len(data)] ^= 1 << bit
    del data[len(data) - cut % len(data) :]
    target = tmp_path / "m.onnx"
    Path(f"{target}.json").write_bytes(bytes(data))
    try:
        want = json.loads(bytes(data))["export"]  # what the bytes say, read here with the json module
    except (ValueError, KeyError, TypeError):
        want = None
    with memory_cap(512 * 2**20):
        try:
            got = read_export_description(target)
        except MecHubError as exc:
            assert str(target) in str(exc)
            return
    assert want is not None and dict(got.export) == want
    assert (got.format, got.sha256, got.head, got.embed_dim) == (
        want["format"],
        want["sha256"],
        want.get("head", "backbone"),
        want["embed_dim"],
    )
    assert got.format in ("onnx", "torchscript") and 0 < got.embed_dim <= MAX_EMBED_DIM


def test_the_onnx_runtime_model_is_an_embedding_model_named_by_its_file(onnx_file: Path):
    """Same protocol as the torch models (tests/models/test_identity.py): the file's own digest names it."""
    import hashlib

    from mec_hub.models.onnx_runtime import OnnxRuntimeModel
    from mec_hub.models.protocol import EmbeddingModel

    model = OnnxRuntimeModel(onnx_file)
    assert isinstance(model, EmbeddingModel)
    identity = model.identity
    assert identity.runtime == "onnxruntime" and identity.pooling is None
    assert identity.weights_sha256 == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert identity.embed_dim == model(_batch(3)).shape[1] and identity.head == "backbone"
    torch_identity = mec_hub.load(MODEL).identity
    assert identity.differences(torch_identity.replace(weights_sha256=identity.weights_sha256)) == [
        "runtime 'onnxruntime' instead of None"
    ]
