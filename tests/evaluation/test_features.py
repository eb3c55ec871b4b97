"""Feature extraction from ImageFolders and feature files, against a direct model forward and files on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mec_hub
from mec_hub.data.featurefile import FeatureMeta
from mec_hub.errors import MecHubError
from mec_hub.evaluation.features import LabelledFeatures, extract_image_folder, load_feature_file, save_feature_file
from mec_hub.evaluation.inputs import InvalidFeaturesError


@pytest.fixture(scope="module")
def small_folder(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 3 images, plus a broken file in one class."""
    root = tmp_path_factory.mktemp("imagefolder")
    for cls in ("bird", "cat", "ship"):
        (root / cls).mkdir()
        for src in sorted((cifar_dir / "test" / cls).iterdir())[:3]:
            shutil.copy(src, root / cls / src.name)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_weights_dir: Path):
    return mec_hub.load(weights=tiny_weights_dir)


def test_extract_equals_direct_forward(small_folder: Path, tiny_model):
    tiny_model.train()  # as a network in the middle of training would be
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*broken\.png"):
        data = extract_image_folder(tiny_model, small_folder, batch_size=4)
    assert tiny_model.training, "the model's mode is restored"

    expected_paths = [f"{cls}/{name}" for cls in ("bird", "cat", "ship")
                      for name in sorted(p.name for p in (small_folder / cls).iterdir() if p.name != "broken.png")]
    assert data.paths == expected_paths
    assert data.classes == ["bird", "cat", "ship"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [Path(p).name for p, _ in data.skipped] == ["broken.png"]

    transform = mec_hub.get_transform(tiny_model)
    tiny_model.eval()
    with torch.no_grad():
        direct = tiny_model(torch.stack([transform(Image.open(small_folder / p).convert("RGB"))
                                         for p in expected_paths]))
    assert data.features.dtype == torch.float32 and data.features.shape == (9, 512)
    torch.testing.assert_close(data.features, direct, rtol=1e-4, atol=1e-5)


def test_validation_folder_uses_training_classes(small_folder: Path, tiny_model, tmp_path: Path):
    val = tmp_path / "val"
    (val / "ship").mkdir(parents=True)
    shutil.copy(next((small_folder / "ship").iterdir()), val / "ship" / "a.png")
    data = extract_image_folder(tiny_model, val, classes=["bird", "cat", "ship"])
    assert data.labels.tolist() == [2] and data.classes == ["bird", "cat", "ship"]

    (val / "dog").mkdir()
    with pytest.raises(MecHubError, match="not among the training classes: dog"):
        extract_image_folder(tiny_model, val, classes=["bird", "cat", "ship"])


def test_missing_or_empty_folder(tiny_model, tmp_path: Path):
    with pytest.raises(MecHubError, match="image folder not found"):
        extract_image_folder(tiny_model, tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(MecHubError, match="no images"):
        extract_image_folder(tiny_model, tmp_path / "empty")


def test_feature_file_round_trip_and_label_sources(tmp_path: Path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 3)).astype(np.float16)  # as mec-embed may store them
    np.save(tmp_path / "x.npy", features)
    (tmp_path / "x.paths.txt").write_text("b/1.png\n/data/a/2.png\nb/3.jpg\nc/sub/4.png\n")

    data = load_feature_file(tmp_path / "x.npy")  # labels from x.paths.txt beside it
    assert data.classes == ["a", "b", "sub"]
    assert data.labels.tolist() == [1, 0, 1, 2]
    assert data.features.dtype == torch.float32
    assert np.array_equal(data.features.numpy(), features.astype(np.float32))

    np.save(tmp_path / "y.npy", np.array([2, 0, 1, 1]))
    by_index = load_feature_file(tmp_path / "x.npy", tmp_path / "y.npy")
    assert by_index.labels.tolist() == [2, 0, 1, 1] and by_index.classes == ["0", "1", "2"]

    save_feature_file(data, tmp_path / "out" / "z.npy", {"model": "m", "weights_sha256": "abc"})
    again = load_feature_file(tmp_path / "out" / "z.npy")
    assert torch.equal(again.features, data.features) and again.paths == data.paths
    ties = ("run_id", "paths_sha256", "features_ends_sha256")  # what the writer adds (mec_hub.data.featurefile)
    on_disk = json.loads((tmp_path / "out" / "z.meta.json").read_text())
    assert {k: v for k, v in on_disk.items() if k not in ties} == {"model": "m", "weights_sha256": "abc"}
    assert isinstance(again.feature_meta, FeatureMeta)
    assert (again.feature_meta.model, again.feature_meta.weights_sha256) == ("m", "abc")
    assert again.feature_meta.run_id == on_disk["run_id"] and again.meta["weights_sha256"] == "abc"


def test_feature_file_errors(tmp_path: Path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(MecHubError, match=r"no labels for .*x\.paths\.txt"):
        load_feature_file(tmp_path / "x.npy")
    (tmp_path / "x.paths.txt").write_text("a/1.png\nb/2.png\n")
    with pytest.raises(InvalidFeaturesError, match=r"has 2 paths but .*x\.npy has 3 rows"):
        load_feature_file(tmp_path / "x.npy")
    np.save(tmp_path / "y.npy", np.zeros(4, dtype=int))
    with pytest.raises(InvalidFeaturesError, match=r"has 4 labels but .*x\.npy has 3 rows"):
        load_feature_file(tmp_path / "x.npy", tmp_path / "y.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InvalidFeaturesError, match=r"not a readable \.npy"):
        load_feature_file(tmp_path / "bad.npy", tmp_path / "y.npy")
    with pytest.raises(MecHubError, match="features file not found"):
        load_feature_file(tmp_path / "missing.npy")


def labelled_by_folder(paths: list[str], *, dim: int, seed: int) -> LabelledFeatures:
    """Random features for ``paths``, labelled by their folder (``a/1.png`` is class ``a``)."""
    classes = sorted({path.split("/")[0] for path in paths})
    features = np.random.default_rng(seed).standard_normal((len(paths), dim)).astype(np.float32)
    labels = [classes.index(path.split("/")[0]) for path in paths]
    return LabelledFeatures(torch.from_numpy(features), torch.tensor(labels), classes, paths=paths)


def test_feature_files_of_two_runs_are_refused(tmp_path: Path):
    """A kill mid-replacement can leave a new X.paths.txt beside the old X.npy and meta: eval must not
    pair them (the labels would be another run's), whatever the row counts say."""
    data = labelled_by_folder(["a/1.png", "b/2.png", "a/3.png"], dim=4, seed=0)
    save_feature_file(data, tmp_path / "x.npy", {"model": None})
    assert load_feature_file(tmp_path / "x.npy").labels.tolist() == [0, 1, 0]
    (tmp_path / "x.paths.txt").write_text("b/1.png\na/2.png\nb/3.png\n", encoding="utf-8")  # another run's paths
    with pytest.raises(InvalidFeaturesError, match=r"do not belong together"):
        load_feature_file(tmp_path / "x.npy")


def test_eval_reads_parquet_output_like_the_npy_it_came_from(tmp_path: Path):
    """``mec-hub eval`` takes a Parquet output of mec-embed: features, paths (labels) and meta as from the .npy set."""
    pytest.importorskip("pyarrow")
    from mec_hub.data.featurefile import FeatureFile, write_parquet

    data = labelled_by_folder(["a/1.png", "b/2.png", "a/3.png", "c/4.png", "b/5.png"], dim=3, seed=1)
    save_feature_file(data, tmp_path / "x.npy", {"model": "m"})
    write_parquet(FeatureFile.open(tmp_path / "x.npy"), tmp_path / "x.parquet", shard_rows=2)
    from_npy = load_feature_file(tmp_path / "x.npy")
    from_parquet = load_feature_file(tmp_path / "x.parquet")
    assert torch.equal(from_parquet.features, data.features)
    assert from_parquet.labels.tolist() == from_npy.labels.tolist() == [0, 1, 0, 2, 1]
    assert from_parquet.classes == ["a", "b", "c"] and from_parquet.paths == data.paths
    assert from_parquet.meta["model"] == "m"


def test_a_feature_set_is_read_once_through_feature_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 19.3: eval opens a set once, by FeatureFile.open (which checks its parts together), and
    passes its FeatureMeta on; labels from another file do not excuse a meta describing other rows."""
    import mec_hub.data.featurefile as featurefile
    import mec_hub.evaluation.features as features_module

    data = labelled_by_folder(["a/1.png", "b/2.png", "a/3.png"], dim=4, seed=2)
    x = save_feature_file(data, tmp_path / "x.npy", {"model": "m", "weights_sha256": "abc"})
    np.save(tmp_path / "y.npy", np.array([1, 1, 0]))
    opens: list[Path] = []
    matrices: list[Path] = []
    real_open = featurefile.FeatureFile.open.__func__
    real_matrix = featurefile.open_matrix

    def spy_open(cls, path, **options):  # type: ignore[no-untyped-def]
        opens.append(Path(path))
        return real_open(cls, path, **options)

    def spy_matrix(path):  # type: ignore[no-untyped-def]
        matrices.append(Path(path))
        return real_matrix(path)

    monkeypatch.setattr(featurefile.FeatureFile, "open", classmethod(spy_open))
    monkeypatch.setattr(featurefile, "open_matrix", spy_matrix)
    monkeypatch.setattr(features_module, "open_matrix", spy_matrix)

    loaded = load_feature_file(x)
    assert opens == [x] and matrices == [x]
    on_disk = json.loads((tmp_path / "x.meta.json").read_text())
    assert isinstance(loaded.feature_meta, FeatureMeta)
    assert (loaded.feature_meta.model, loaded.feature_meta.run_id) == ("m", on_disk["run_id"])
    assert loaded.labels.tolist() == [0, 1, 0]

    opens.clear()
    matrices.clear()
    by_index = load_feature_file(x, tmp_path / "y.npy")
    assert opens == [x] and matrices == [x, tmp_path / "y.npy"]
    assert by_index.labels.tolist() == [1, 1, 0] and by_index.feature_meta.weights_sha256 == "abc"

    (tmp_path / "x.meta.json").write_text(json.dumps({**on_disk, "shape": [4, 4]}))
    with pytest.raises(InvalidFeaturesError, match=r"x\.npy has shape \[3, 4\], x\.meta\.json says \[4, 4\]"):
        load_feature_file(x, tmp_path / "y.npy")


def test_a_parquet_set_takes_labels_from_another_file(tmp_path: Path):
    pytest.importorskip("pyarrow")
    from mec_hub.data.featurefile import FeatureFile, write_parquet

    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    FeatureFile.write(tmp_path / "x.npy", ["a/1.png", "b/2.png", "a/3.png"], {"model": "m"}, matrix=matrix)
    write_parquet(FeatureFile.open(tmp_path / "x.npy"), tmp_path / "x.parquet")
    np.save(tmp_path / "y.npy", np.array([2, 0, 1]))
    loaded = load_feature_file(tmp_path / "x.parquet", tmp_path / "y.npy")
    assert loaded.features.numpy().tolist() == matrix.tolist() and loaded.labels.tolist() == [2, 0, 1]
    assert loaded.classes == ["0", "1", "2"] and loaded.feature_meta.model == "m"
