"""Shared by the two-process pretraining tests (training/test_distributed.py and its stress test)."""

from __future__ import annotations

from pathlib import Path

WORLD = 2


def pretrain_arguments(images: Path, out: Path) -> list[str]:
    """16 images, global batch 8: 2 steps per epoch, 2 epochs (lr 0 at step 1 of the warm-up, then 3 steps)."""
    return [
        "--data", str(images), "--output-dir", str(out),
        "--arch", "test_resnet", "--image-size", "32", "--dim", "32", "--hidden-dim", "64", "--pred-dim", "16",
        "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--lamda-warmup-epochs", "1",
        "--lr", "4.0", "--teacher-momentum", "0.9",
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard",
    ]  # fmt: skip
