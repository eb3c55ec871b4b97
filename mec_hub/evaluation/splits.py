"""The two labelled sides of an evaluation (train and val features) and what made them.

Either a model embeds two ImageFolders here (``EvalSplits.from_image_folders``), or two feature
files made earlier are read (``EvalSplits.from_feature_files``: from ``mec-embed`` or
``--save-features``), checked to come from the same model. Either way the result carries the
``model`` and ``data`` sections of the report (``mec_hub.evaluation.report``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mec_hub.data.featurefile import PATHS_SUFFIX, FeatureMeta, sidecar
from mec_hub.errors import InvalidArgumentError
from mec_hub.evaluation.features import LabelledFeatures, extract_image_folder, load_feature_file, save_feature_file
from mec_hub.evaluation.inputs import InvalidFeaturesError
from mec_hub.models.encoder import MECEncoder
from mec_hub.models.loading import create_model, load
from mec_hub.runtime.devices import resolve_device
from mec_hub.weights.identity import weights_origin
from mec_hub.weights.registry import is_registered

# What the report says about a model, in this order (after "model" and "weights").
_MODEL_KEYS = ("weights_sha256", "pretrained", "architecture", "head", "embed_dim", "preprocessing")


def load_eval_model(
    name: str | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    head: str = "backbone",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> MECEncoder:
    """The encoder to evaluate: ``mec_hub.load(name, weights=...)``.

    With ``random_init``, the same architecture and preprocessing with random weights drawn from
    ``seed`` (the baseline a trained model must beat): ``mec_hub.create_model``, the architecture
    taken from ``name`` or from what ``weights`` names (a folder's ``config.json``, a file's), never
    from both. The caller's random state is left as it was.
    """
    if not random_init:
        return load(name, weights=weights, head=head, device=device)
    if name is not None and weights is not None:
        raise InvalidArgumentError(
            "name= and weights= were both given with random_init=True: random weights take the "
            "architecture from one of them; drop the other",
            arguments=("name", "weights", "random_init"),
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, config=weights, head=head, device=device)


def check_same_source(train: LabelledFeatures, val: LabelledFeatures, *, train_name: str, val_name: str) -> None:
    """Refuse train and val features that cannot come from one model: other widths, other weights."""
    if train.features.shape[1] != val.features.shape[1]:
        raise InvalidFeaturesError(
            f"{train_name} has {train.features.shape[1]} dimensions but {val_name} has "
            f"{val.features.shape[1]}; they must come from the same model"
        )
    sha_train, sha_val = (part.feature_meta.weights_sha256 if part.feature_meta else None for part in (train, val))
    if sha_train and sha_val and sha_train != sha_val:
        raise InvalidFeaturesError(
            f"{train_name} and {val_name} were made with different weights "
            f"(sha256 {sha_train[:12]}... vs {sha_val[:12]}...)"
        )


def _features_meta(model: MECEncoder, weights: str | None, *, pretrained: bool, head: str) -> FeatureMeta:
    """What made the features, as mec-embed's FEATS.meta.json says it (so search can use them)."""
    identity = model.identity.replace(
        model=model.name if model.name and is_registered(model.name) else None, head=head, state_dict_sha256=None
    )
    if pretrained:
        identity = identity.replace(weights=weights_origin(weights)[1])
    else:
        identity = identity.replace(weights_sha256=None)
    fixed = {"pretrained": pretrained, "normalize": False, "precision": "fp32", "out_dtype": "float32"}
    return FeatureMeta.from_json({**identity.to_json(), **fixed})


def model_section(
    model: MECEncoder, name: str | None, weights: str | os.PathLike[str] | None, *, random_init: bool, head: str
) -> dict[str, Any]:
    """The report's ``model`` section for a model loaded by :func:`load_eval_model` from ``name``/``weights``."""
    given = str(weights) if weights is not None else name
    meta = _features_meta(model, given, pretrained=not random_init, head=head).to_json()
    return {
        "model": model.name,
        "weights": None if random_init or weights is None else str(weights),
        **{key: meta.get(key) for key in _MODEL_KEYS},
    }


@dataclass
class EvalSplits:
    """Train and val features with the report's ``model`` and ``data`` sections.

    ``seconds`` holds the time of each stage so far (``load_model``, ``extract_features`` or
    ``load_features``); ``feature_meta`` is what ``save_features`` writes beside the features
    (``None`` for features read from files, which are saved already).
    """

    train: LabelledFeatures
    val: LabelledFeatures
    model: dict[str, Any]
    data: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    feature_meta: FeatureMeta | None = None

    @classmethod
    def from_feature_files(
        cls,
        train_features: str | os.PathLike[str],
        val_features: str | os.PathLike[str],
        *,
        train_labels: str | os.PathLike[str] | None = None,
        val_labels: str | os.PathLike[str] | None = None,
    ) -> EvalSplits:
        """Read ``X.npy`` files and their labels (default ``X.paths.txt``; see ``load_feature_file``).

        The val classes are the train classes; train and val must have the same width and, when
        both say, the same weights' SHA-256.
        """
        start = time.perf_counter()
        train = load_feature_file(train_features, train_labels)
        val = load_feature_file(val_features, val_labels, classes=train.classes)
        seconds = {"load_features": time.perf_counter() - start}
        check_same_source(train, val, train_name=str(train_features), val_name=str(val_features))
        recorded = train.feature_meta or FeatureMeta()
        model: dict[str, Any] = {
            key: getattr(recorded, key) for key in ("model", "weights", "weights_sha256", "head", "embed_dim")
        }
        model["embed_dim"] = int(train.features.shape[1])
        data = {
            split: {
                "features": str(features),
                "labels": str(labels if labels is not None else sidecar(features, PATHS_SUFFIX)),
                "count": len(part),
            }
            for split, part, features, labels in (
                ("train", train, train_features, train_labels),
                ("val", val, val_features, val_labels),
            )
        }
        return cls(train, val, model, data, seconds)

    @classmethod
    def from_image_folders(
        cls,
        train_dir: str | os.PathLike[str],
        val_dir: str | os.PathLike[str],
        *,
        name: str | None = None,
        weights: str | os.PathLike[str] | None = None,
        random_init: bool = False,
        head: str = "backbone",
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> EvalSplits:
        """Embed two ImageFolders with ``load_eval_model(name, weights=..., ...)``.

        The val folder is labelled with the train folder's classes; unreadable images are skipped
        and listed in ``data``.
        """
        device = resolve_device(device)
        start = time.perf_counter()
        model = load_eval_model(name, weights=weights, random_init=random_init, head=head, device=device, seed=seed)
        seconds = {"load_model": time.perf_counter() - start}
        start = time.perf_counter()
        train = extract_image_folder(
            model, train_dir, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress
        )
        val = extract_image_folder(
            model,
            val_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            classes=train.classes,
        )
        seconds["extract_features"] = time.perf_counter() - start
        given = str(weights) if weights is not None else name
        meta = _features_meta(model, given, pretrained=not random_init, head=head)
        model_info = model_section(model, name, weights, random_init=random_init, head=head)
        data = {
            split: {"folder": str(folder), "count": len(part), "skipped": [path for path, _ in part.skipped]}
            for split, part, folder in (("train", train, train_dir), ("val", val, val_dir))
        }
        return cls(train, val, model_info, data, seconds, feature_meta=meta)

    def save_features(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write ``folder/train.npy`` and ``folder/val.npy`` (with paths and meta), reusable as feature files."""
        if self.feature_meta is None:
            raise ValueError("these features were read from files; there is nothing new to save")
        out = Path(folder)
        written = []
        for split, part in (("train", self.train), ("val", self.val)):
            source = str(Path(self.data[split]["folder"]).resolve())
            meta = dataclasses.replace(self.feature_meta, inputs=[source], base_dir=source)
            written.append(save_feature_file(part, out / f"{split}.npy", meta))
        return written
