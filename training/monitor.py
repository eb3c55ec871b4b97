"""kNN monitor: top-1 of a weighted kNN vote on backbone features, measured during training."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mec_hub
from mec_hub.evaluation.features import extract_image_folder
from mec_hub.evaluation.knn import knn_classify


class KnnMonitor:
    """Extracts backbone features of ``train_dir`` and ``val_dir`` (ImageFolder layouts) and votes.

    Uses ``mec_hub.evaluation`` (features with the run's evaluation preprocessing, cosine
    similarity, ``k`` neighbours weighted by ``exp(s / temperature)``). The backbone is put in
    eval mode for the measurement and restored afterwards; nothing it holds changes.
    """

    def __init__(
        self,
        train_dir: str | os.PathLike[str],
        val_dir: str | os.PathLike[str],
        *,
        preprocessing: Mapping[str, Any],
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:

        for option, folder in (("--knn-train", train_dir), ("--knn-val", val_dir)):
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"{option}: {folder} is not a folder")
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)
        self.transform = mec_hub.get_transform(dict(preprocessing))
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> float:

        was_training = backbone.training
        backbone.eval()
        try:
            common = {
                "transform": self.transform,
                "batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "device": self.device,
            }
            train = extract_image_folder(backbone, self.train_dir, **common)
            val = extract_image_folder(backbone, self.val_dir, classes=train.classes, **common)
        finally:
            backbone.train(was_training)
        result = knn_classify(
            train.features,
            train.labels,
            val.features,
            val.labels,
            k=self.k,
            temperature=self.temperature,
            num_classes=len(train.classes),
        )
        return float(result.top1)

    def settings(self) -> dict[str, Any]:
        """What a figure of this monitor is: its protocol and folders (plain data, for a checkpoint)."""
        return {"k": self.k, "temperature": self.temperature, "bank": str(self.train_dir), "val": str(self.val_dir)}
