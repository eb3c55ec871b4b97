"""``mec_hub.Embedder`` / ``mec_hub.embed``: the same numbers as a plain forward, from every kind of input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mec_hub
from mec_hub.data.images import ImageDecodeError
from mec_hub.embedding.engine import Embedder, ModelMismatchError
from mec_hub.errors import MecHubError
from tests.support.embedding import make_images

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def embedder(tiny_weights_dir: Path) -> Embedder:
    return Embedder(weights=tiny_weights_dir, device="cpu", batch_size=5, num_workers=1)


def test_paths_give_the_plain_forward(embedder: Embedder, photos: list[Path], photo_reference: np.ndarray):
    features = embedder.embed(photos)  # 18 photos > batch size: decoded by a worker process
    assert features.shape == (18, 512) and features.dtype == np.float32
    np.testing.assert_allclose(features, photo_reference, **TOL)


def test_pil_images_and_tensors_give_the_same_rows(embedder: Embedder, photos: list[Path], tiny_weights_dir: Path):
    some = photos[:4]
    from_paths = embedder.embed([str(p) for p in some])
    images = [Image.open(p) for p in some]
    np.testing.assert_array_equal(embedder.embed(images), from_paths)
    np.testing.assert_allclose(embedder.embed(images[0]), from_paths[:1], **TOL)  # a batch of one

    model = mec_hub.load(weights=tiny_weights_dir)
    transform = mec_hub.get_transform(model)
    batch = torch.stack([transform(im.convert("RGB")) for im in images])
    with torch.no_grad():
        direct = model(batch).numpy()
    np.testing.assert_allclose(embedder.embed(batch), direct, **TOL)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        embedder.embed(torch.zeros(2, 1, 32, 32))


def test_one_liner_and_lazy_export(tiny_weights_dir: Path, photos: list[Path], photo_reference: np.ndarray):
    features = mec_hub.embed(photos[:3], weights=tiny_weights_dir, device="cpu", normalize=True, out_dtype="float16")
    assert features.dtype == np.float16
    expected = photo_reference[:3] / np.linalg.norm(photo_reference[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(features.astype(np.float32), expected, atol=1e-3)
    assert mec_hub.Embedder is Embedder


def test_an_unreadable_file_raises_naming_it(embedder: Embedder, photos: list[Path], odd_images_dir: Path):
    with pytest.raises(ImageDecodeError) as info:
        embedder.embed([photos[0], odd_images_dir / "truncated.png"])
    assert "truncated.png" in str(info.value) and "truncated image data" in str(info.value)


def test_precision_rules(tiny_weights_dir: Path, photos: list[Path], photo_reference: np.ndarray):
    with pytest.raises(MecHubError, match="fp16 autocast needs a CUDA device"):
        Embedder(weights=tiny_weights_dir, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        Embedder(weights=tiny_weights_dir, device="cpu", precision="int4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "this CPU has no bf16 instructions" on older CPUs
        bf16 = Embedder(weights=tiny_weights_dir, device="cpu", precision="bf16").embed(photos[:6])
    ref = photo_reference[:6]
    cosine = (bf16 * ref).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.99
    assert not np.allclose(bf16, ref, rtol=1e-5, atol=1e-5)  # bf16 really ran


def test_a_loaded_module_is_accepted(tiny_weights_dir: Path, photos: list[Path], photo_reference: np.ndarray):
    module = mec_hub.load(weights=tiny_weights_dir, head="projector")
    embedder = Embedder(module, device="cpu")
    assert embedder.head == "projector" and embedder.embed_dim == 128
    np.testing.assert_allclose(
        embedder.embed(photos[:2]),
        module(torch.stack([mec_hub.get_transform(module)(Image.open(p).convert("RGB")) for p in photos[:2]]))
        .detach()
        .numpy(),
        **TOL,
    )
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(TypeError, match="pretrained_cfg"):
        Embedder(plain, device="cpu")
    plain.pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 1.0}
    generic = Embedder(plain, device="cpu")
    assert generic.embed_dim == 4 and generic.identity.state_dict_sha256


def test_progress_bar_shows_rate(embedder: Embedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_images(tmp_path / "imgs", 7)
    embedder.embed_folder(tmp_path / "imgs", tmp_path / "f.npy", progress=True)
    err = capsys.readouterr().err
    assert "embedding" in err and "7/7" in err and "img/s" in err


def test_from_meta_rebuilds_the_same_embedder(
    embedder: Embedder, tiny_weights_dir: Path, tmp_path: Path, photos: list[Path]
):
    images = make_images(tmp_path / "imgs", 6)
    result = embedder.embed_folder(tmp_path / "imgs", tmp_path / "f.npy", progress=False)
    rebuilt = Embedder.from_meta(result.meta_path, device="cpu", num_workers=0)
    assert rebuilt.weights_sha256 == result.meta["weights_sha256"] == embedder.weights_sha256
    np.testing.assert_array_equal(rebuilt.embed(images), np.load(result.features))

    meta = json.loads(result.meta_path.read_text())
    other = tmp_path / "other"
    from tests.support.weights import make_tiny_hub_folder

    make_tiny_hub_folder(other, seed=1)
    with pytest.raises(ModelMismatchError, match="weights SHA-256"):
        Embedder.from_meta({**meta, "weights": str(other)}, device="cpu")
    with pytest.raises(ModelMismatchError, match="preprocessing"):
        Embedder.from_meta({**meta, "preprocessing": {**meta["preprocessing"], "input_size": [3, 64, 64]}})


def test_on_commit_reports_each_saved_batch_and_can_stop_the_run(embedder: Embedder, tmp_path: Path):
    make_images(tmp_path / "imgs", 12)
    (tmp_path / "imgs" / "zz_empty.png").write_bytes(b"")  # item 13 of the sorted walk: a failure
    seen = []
    embedder.embed_folder(tmp_path / "imgs", tmp_path / "ref.npy", progress=False, on_commit=seen.append)
    # batches of 5 (the fixture's batch size) over 13 images, the last one failing
    assert [(p.done, p.total, p.failed) for p in seen] == [(5, 13, 0), (10, 13, 0), (13, 13, 1)]

    class Stop(Exception):
        pass

    def stop_after_the_first_batch(progress: Any) -> None:
        raise Stop

    with pytest.raises(Stop):
        embedder.embed_folder(
            tmp_path / "imgs", tmp_path / "f.npy", progress=False, on_commit=stop_after_the_first_batch
        )
    assert not (tmp_path / "f.npy").exists()  # stopped: nothing final-looking, the first batch kept
    resumed: list[Any] = []
    embedder.embed_folder(tmp_path / "imgs", tmp_path / "f.npy", progress=False, resume=True, on_commit=resumed.append)
    assert [(p.done, p.total, p.failed) for p in resumed] == [(10, 13, 0), (13, 13, 1)]
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert (tmp_path / "f.paths.txt").read_text() == (tmp_path / "ref.paths.txt").read_text()


def test_a_float64_or_float16_batch_is_computed_in_float32(embedder: Embedder, tiny_weights_dir: Path):
    batch = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = mec_hub.load(weights=tiny_weights_dir)
    with torch.no_grad():
        direct = model(batch.float()).numpy()
        direct_half = model(batch.half().float()).numpy()
    np.testing.assert_allclose(embedder.embed(batch), direct, **TOL)
    np.testing.assert_allclose(embedder.embed(batch.half()), direct_half, **TOL)


def test_batch_size_and_num_workers_are_whole_numbers(tiny_weights_dir: Path):
    for bad in (2.7, 3.0, "4", True):
        with pytest.raises(ValueError, match="batch_size must be a whole number"):
            Embedder(weights=tiny_weights_dir, device="cpu", batch_size=bad)
    with pytest.raises(ValueError, match="num_workers must be a whole number"):
        Embedder(weights=tiny_weights_dir, device="cpu", num_workers=1.5)
    assert Embedder(weights=tiny_weights_dir, device="cpu", batch_size=np.int64(3), num_workers=0).batch_size == 3


def test_from_meta_refuses_a_record_that_names_no_model(tiny_weights_dir: Path):
    for empty in ({}, {"head": "backbone", "embed_dim": 512}):  # not the package's default model, silently
        with pytest.raises(MecHubError, match="names no model"):
            Embedder.from_meta(empty, device="cpu")
    assert Embedder.from_meta({}, weights=str(tiny_weights_dir), device="cpu").embed_dim == 512  # named here


def test_batches_are_pulled_in_order_and_count_every_item(
    embedder: Embedder, photos: list[Path], photo_reference: np.ndarray, odd_images_dir: Path, tmp_path: Path
):
    """The engine yields batches; a consumer that stops early leaves no worker or blocked signal behind."""
    import signal

    from mec_hub.embedding.loader import ImageSource

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    items = [str(p) for p in photos[:7]] + [str(broken)] + [str(p) for p in photos[7:]]
    batches = list(embedder.batches(ImageSource(items, embedder.transform), 2, len(items)))
    assert [b.end for b in batches] == [7, 12, 17, 19]  # batch_size 5 from item 2; the last one short
    assert [i for b in batches for i in b.indices] == [i for i in range(2, 19) if i != 7]
    assert [i for b in batches for i, _ in b.failures] == [7]
    np.testing.assert_allclose(np.concatenate([b.features for b in batches]), photo_reference[2:], **TOL)

    stream = embedder.batches(ImageSource(items, embedder.transform))
    next(stream)
    assert signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # held while the batch is ours
    stream.close()
    assert signal.SIGCHLD not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_embed_folder_to_a_parquet_name_writes_parquet(embedder: Embedder, photos_dir: Path, tmp_path: Path,
                                                       photo_reference: np.ndarray):
    """The Python API chooses the format from the name, as mec-embed does (not X.parquet.npy)."""
    pq = pytest.importorskip("pyarrow.parquet")
    result = embedder.embed_folder(photos_dir, tmp_path / "feats.parquet", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.parquet"]
    assert result.features == tmp_path / "feats.parquet"
    table = pq.read_table(tmp_path / "feats.parquet")
    assert table.column("path").to_pylist() == sorted(p.name for p in photos_dir.iterdir())
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist(), np.float32), photo_reference, **TOL)

    embedder.embed_folder(photos_dir, tmp_path / "sharded.parquet", shard_rows=7, progress=False)
    shards = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sharded"))
    assert len(shards) == 3 and [pq.read_metadata(tmp_path / s).num_rows for s in shards] == [7, 7, 4]
    with pytest.raises(MecHubError, match="shard_rows applies to Parquet output"):
        embedder.embed_folder(photos_dir, tmp_path / "x.npy", shard_rows=7, progress=False)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_the_output_lock_is_held_until_the_files_are_published(
    embedder: Embedder, photos_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
):
    """A second run cannot take the outputs while the first one is still renaming them into place."""
    from mec_hub.data.featurefile import FeatureFile
    from mec_hub.embedding.outputs import OutputError, OutputTarget, ParquetTarget, RunLock

    out = tmp_path / f"feats{suffix}"
    attempts: list[str] = []

    def try_to_take_the_lock() -> None:
        try:
            lock = RunLock(OutputTarget.for_out(out).files)
            lock.acquire()
            lock.release()
            attempts.append("taken")
        except OutputError:
            attempts.append("refused")

    real_write, real_publish = FeatureFile.write, ParquetTarget.publish

    def write(*args: Any, **kwargs: Any) -> Any:
        try_to_take_the_lock()
        return real_write(*args, **kwargs)

    def publish(self: ParquetTarget) -> Any:
        try_to_take_the_lock()
        return real_publish(self)

    monkeypatch.setattr(FeatureFile, "write", staticmethod(write))
    monkeypatch.setattr(ParquetTarget, "publish", publish)
    embedder.embed_folder(photos_dir, out, progress=False)
    assert attempts == (["refused"] if suffix == ".npy" else ["refused", "refused"])
    try_to_take_the_lock()
    assert attempts[-1] == "taken"


def test_normalized_float16_rows_are_unit_norm_also_for_large_features():
    """--normalize --out-dtype float16: unit norm to float16 precision, whatever the features' scale."""

    class Loud(torch.nn.Module):  # features with norms in the hundreds, of uneven size per row
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 64)
            self.pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 1.0}
            self.embed_dim = 64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 300.0 * (1 + x.abs().mean(dim=(1, 2, 3), keepdim=False)[:, None]) * self.linear(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    images = torch.randn(20, 3, 16, 16) * 3
    loud = Loud()
    with torch.no_grad():
        raw = loud(images).double().numpy()
    assert np.linalg.norm(raw, axis=1).min() > 100  # the premise: large features
    rows = Embedder(loud, device="cpu", normalize=True, out_dtype="float16").embed(images)
    assert rows.dtype == np.float16
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # float16 keeps ~3 decimal digits per value
    np.testing.assert_allclose(rows.astype(np.float64), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-3)
