"""Frozen features with their labels: extracted from an ImageFolder, or read from ``.npy`` files.

Labels follow torchvision's ImageFolder: the sorted names of the class folders are the classes,
and a class's index is its position in that list. A validation folder is labelled with the
*training* class list (pass ``classes=train.classes``), so that the same class gets the same
index on both sides even when the validation folder lacks a class.

Feature files are those ``mec-embed`` writes (and ``mec-hub eval --save-features``): ``X.npy``,
an ``(N, D)`` array, with row-aligned labels from either

* ``X.paths.txt`` beside it (found automatically), or any text file given as labels: one image
  path per line, the class of a row being the name of the folder holding its image
  (``cat/0001.png`` and ``/data/val/cat/0001.png`` are both ``cat``); or
* an integer ``.npy`` vector of class indices (classes are then named ``"0"``, ``"1"``, ...).

``X.meta.json`` beside it, when present, says which model made the features. A Parquet output of
mec-embed (``X.parquet``, or its shards) is read too: it holds the paths and the meta itself.
Every feature file is opened once, by ``FeatureFile.open``, which checks that its parts belong
together; its ``FeatureMeta`` travels on as ``LabelledFeatures.feature_meta``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.datasets.folder import make_dataset
from tqdm.auto import tqdm

from mec_hub.data.featurefile import (
    PARQUET_SUFFIX,
    PATHS_SUFFIX,
    FeatureFile,
    FeatureMeta,
    open_matrix,
    parquet_shards,
    read_paths,
    sidecar,
)
from mec_hub.data.images import IMAGE_EXTENSIONS
from mec_hub.data.transforms import get_transform
from mec_hub.embedding.loader import ImageSource
from mec_hub.embedding.runner import BatchRunner
from mec_hub.errors import MecHubError
from mec_hub.evaluation.inputs import InvalidFeaturesError, as_feature_matrix, as_label_vector


@dataclass
class LabelledFeatures:
    """``features``: float32 ``(N, D)``; ``labels``: int64 ``(N,)`` indices into ``classes``.

    ``paths`` (row-aligned image paths, when known), ``skipped`` (images that could not be read,
    as ``(path, reason)``) and ``feature_meta`` (what made the features, e.g. ``X.meta.json``) are
    extras; ``meta`` is that record as its JSON object (``{}`` when there is none).
    """

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    feature_meta: FeatureMeta | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def meta(self) -> dict[str, Any]:
        """``feature_meta`` as the JSON object ``X.meta.json`` holds (``{}`` when there is none)."""
        return self.feature_meta.to_json() if self.feature_meta is not None else {}


# --------------------------------------------------------------------------- image folders


def list_image_folder(
    folder: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, label), ...], classes)`` of an ImageFolder; ``classes`` forces the class list."""
    root = Path(folder)
    if not root.is_dir():
        raise MecHubError(f"image folder not found: {root}")
    own = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not own:
        raise MecHubError(f"{root}: no class folders (expected an ImageFolder: {root}/CLASS/IMAGE)")
    if classes is None:
        classes = own
    else:
        classes = list(classes)
        unknown = [name for name in own if name not in classes]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise MecHubError(f"{root}: class folders not among the training classes: {shown}")
    class_to_idx = {name: classes.index(name) for name in own}
    samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    if not samples:
        raise MecHubError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return samples, list(classes)


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def default_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    try:
        return get_transform(model)
    except TypeError:
        raise TypeError(
            f"cannot tell which preprocessing a {type(model).__name__} expects; pass transform=..."
        ) from None


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    paths: Sequence[str],
    *,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """``(features (M, D) float32 on CPU, kept row indices, [(index, reason) of unreadable images])``.

    The model runs in eval mode (its previous mode is restored afterwards, so a network in
    training can be evaluated in the middle of a run) without gradients, on ``device``
    (default: where its parameters are).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    transform = transform or default_transform(model)
    device = torch.device(device) if device is not None else model_device(model)
    where = model_device(model)
    if where.type != device.type or (None not in (where.index, device.index) and where.index != device.index):
        raise ValueError(f"the model is on {where}, not on device={device}; move it there first")
    # The pipeline of mec-embed (decode_image: EXIF rotation, alpha over white, 16-bit and LAB;
    # decoding in workers; a file that crashes or hangs a worker becomes a failure), so features
    # measured here equal those of an embedded folder.
    pre = getattr(model, "pretrained_cfg", None)
    input_size = tuple(pre["input_size"]) if isinstance(pre, dict) and "input_size" in pre else (3, 1, 1)
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    failed: list[tuple[int, str]] = []
    bar = None
    if progress:
        bar = tqdm(total=len(paths), desc="features", unit="img", leave=False)

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = model(images.to(device, non_blocking=True))
        if out.ndim != 2:
            raise ValueError(f"the model returned shape {tuple(out.shape)}; expected (N, D) features")
        return out

    runner = BatchRunner(
        forward=forward,
        finish=lambda out: np.empty((0, 0), np.float32) if out is None else out.float().cpu().numpy(),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        # Only the shape of a batch in which no image could be read; such a batch never reaches the model.
        input_size=input_size,
    )
    was_training = model.training
    model.eval()
    try:
        for batch in runner.batches(ImageSource(list(paths), transform), 0, len(paths)):
            failed.extend(batch.failures)
            if batch.indices:
                chunks.append(torch.from_numpy(batch.features))
                kept.extend(batch.indices)
            if bar is not None:
                bar.update(len(batch.indices) + len(batch.failures))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not chunks:
        raise MecHubError(f"none of the {len(paths)} images could be read")
    return torch.cat(chunks), kept, failed


def extract_image_folder(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    classes: Sequence[str] | None = None,
    progress: bool = False,
) -> LabelledFeatures:
    """Features of every image of an ImageFolder, with ImageFolder labels.

    ``model`` maps ``(N, 3, H, W)`` to ``(N, D)``; ``transform`` (PIL image to tensor) defaults to
    ``mec_hub.get_transform(model)``. ``classes`` imposes the class list (give the training
    set's when extracting a validation set). Unreadable images are skipped with a warning and
    listed in ``skipped``; ``paths`` are relative to ``folder``.
    """
    samples, classes = list_image_folder(folder, classes)
    root = Path(folder)
    paths = [path for path, _ in samples]
    features, kept, failed = extract_features(
        model,
        paths,
        transform=transform,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    skipped = [(paths[i], reason) for i, reason in failed]
    if skipped:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable images: {shown}", stacklevel=2)
    return LabelledFeatures(
        features=features,
        labels=torch.tensor([samples[i][1] for i in kept], dtype=torch.long),
        classes=classes,
        paths=[os.path.relpath(paths[i], root) for i in kept],
        skipped=skipped,
        feature_meta=FeatureMeta(format=None, inputs=[str(root)]),
    )


# --------------------------------------------------------------------------- feature files


def _load_npy(path: Path, *, what: str) -> np.ndarray:
    if not path.is_file():
        raise MecHubError(f"{what} not found: {path}")
    try:
        return open_matrix(path)  # the feature-file module's one reader of a .npy (memory-mapped, no pickles)
    except MecHubError as exc:
        raise InvalidFeaturesError(str(exc)) from None


def _open_features(path: Path, *, with_paths: bool) -> FeatureFile:
    """The feature set at ``path``, opened once (its parts checked against each other)."""
    if not path.is_file() and not (path.suffix == PARQUET_SUFFIX and parquet_shards(path)):
        raise MecHubError(f"features file not found: {path}")
    try:
        return FeatureFile.open(path, with_paths=with_paths)
    except InvalidFeaturesError:
        raise
    except MecHubError as exc:
        raise InvalidFeaturesError(str(exc)) from None


def labels_from_paths(
    paths: Sequence[str], *, origin: str, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Class of each path: the name of its folder, as an index into ``classes`` (default: sorted names)."""
    names = []
    for row, line in enumerate(paths):
        name = Path(line.replace("\\", "/")).parent.name
        if not name:
            raise InvalidFeaturesError(
                f"{origin}: row {row} ({line!r}) has no folder to take its class from; "
                "paths must look like CLASS/IMAGE (or pass integer labels as a .npy file)"
            )
        names.append(name)
    if classes is None:
        classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InvalidFeaturesError(f"{origin}: classes not among the training classes: {shown}")
    return np.array([index[name] for name in names], dtype=np.int64), list(classes)


def load_feature_file(
    features: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
) -> LabelledFeatures:
    """Read ``X.npy`` (or ``X.parquet``) and its labels (see the module docstring for the accepted label files).

    ``labels`` defaults to the set's own paths (``X.paths.txt`` beside the features, or the
    Parquet ``path`` column). ``classes`` imposes the class list (give the training set's when
    reading a validation set).
    """
    features_path = Path(features)
    parquet = features_path.suffix == PARQUET_SUFFIX
    label_path = Path(labels) if labels is not None else None
    own_paths = sidecar(features_path, PATHS_SUFFIX)
    if label_path is None and not parquet and features_path.is_file() and not own_paths.is_file():
        raise MecHubError(
            f"no labels for {features_path}: no {own_paths.name} beside it; pass a labels file "
            "(an integer .npy vector, or a text file of CLASS/IMAGE paths)"
        )
    # One read of the set: rows, paths (when they are the labels) and meta, checked together.
    opened = _open_features(features_path, with_paths=label_path is None)
    tensor = as_feature_matrix(np.array(opened.matrix, dtype=np.float32), what=str(features_path))  # a copy
    rows = tensor.shape[0]
    paths = opened.paths
    if label_path is None and paths is not None:  # the set's own paths (FeatureFile.open read them)
        origin = str(features_path if parquet else own_paths)
        values, classes = labels_from_paths(paths, origin=origin, classes=classes)
        label_tensor = torch.from_numpy(values)
    elif label_path.suffix == ".npy":
        raw = _load_npy(label_path, what="labels file")
        label_tensor = as_label_vector(np.array(raw), what=str(label_path), length=rows, length_of=str(features_path))
        largest = int(label_tensor.max()) if label_tensor.numel() else -1
        if classes is None:
            classes = [str(i) for i in range(largest + 1)]
        elif largest >= len(classes):
            raise InvalidFeaturesError(
                f"{label_path}: label {largest} is not among the {len(classes)} training classes"
            )
    else:
        try:
            paths = read_paths(label_path)
        except MecHubError as exc:
            raise InvalidFeaturesError(str(exc)) from None
        if len(paths) != rows:
            raise InvalidFeaturesError(
                f"{label_path} has {len(paths)} paths but {features_path} has {rows} rows; "
                "they must match one to one"
            )
        values, classes = labels_from_paths(paths, origin=str(label_path), classes=classes)
        label_tensor = torch.from_numpy(values)
    return LabelledFeatures(
        features=tensor,
        labels=label_tensor,
        classes=list(classes),
        paths=list(paths) if paths is not None else None,
        feature_meta=opened.meta,
    )


def save_feature_file(
    data: LabelledFeatures, path: str | os.PathLike[str], meta: FeatureMeta | Mapping[str, Any]
) -> Path:
    """Write ``X.npy``, ``X.paths.txt`` and ``X.meta.json``, each atomically, for ``load_feature_file``."""
    path = Path(path)
    if not path.name.endswith(".npy"):
        raise ValueError(f"{path}: the features file name must end in .npy")
    if data.paths is None:
        raise ValueError("these features have no paths to write")
    return FeatureFile.write(path, data.paths, meta, matrix=data.features.numpy())
