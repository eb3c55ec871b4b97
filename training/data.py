"""Training data: any folder of images and the two MoCo v3 views of each.

The dataset and the global-batch sampler are those of ``mec_hub.data.datasets``: the data order is
a function of ``(seed, epoch)`` and each sample's augmentation of ``(seed, epoch, index)``, so a
run sees the same pixels whatever the number of workers, ranks, or restarts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from mec_hub.data.datasets import SeededImages
from mec_hub.data.images import IMAGE_EXTENSIONS
from mec_hub.weights.config import IMAGENET_MEAN, IMAGENET_STD


def find_images(root: str | os.PathLike[str]) -> list[str]:
    """Paths of all images under ``root`` (recursively, following links), relative and sorted.

    Hidden files and folders are skipped; class folders, if any, are just folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: {root} is not a folder")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(rel, name)))
    if not found:
        raise FileNotFoundError(f"--data: no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


# --------------------------------------------------------------------------------------------
# augmentations


class GaussianBlur:
    """PIL Gaussian blur with ``radius = sigma ~ U(sigma_min, sigma_max)`` (SimCLR / MoCo v3).

    Kept rather than ``torchvision.transforms.GaussianBlur``, which blurs with a fixed kernel size
    where the recipe blurs with PIL's radius. Draws its radius from torch's generator (not
    Python's ``random``), which the dataset seeds per sample: exact resumption depends on it.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def mocov3_view(image_size: int, *, blur_p: float, solarize_p: float) -> transforms.Compose:
    """One MoCo v3 view: crop (scale 0.2-1), colour jitter (p 0.8), grayscale (0.2), blur, solarize, flip."""
    steps: list[Callable] = [
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        steps.append(transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_p))
    if solarize_p > 0:  # PIL's solarize at 128; draws its coin from torch's RNG, like RandomApply
        steps.append(transforms.RandomSolarize(threshold=128, p=solarize_p))
    steps += [
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return transforms.Compose(steps)


AUGMENTATIONS = ("mocov3", "mocov3-noblur")


def mocov3_views(image_size: int = 224, augmentation: str = "mocov3") -> tuple[transforms.Compose, transforms.Compose]:
    """The asymmetric pair of the official recipe: blur always in view 1; blur 0.1 and solarize 0.2 in view 2.

    ``"mocov3-noblur"`` drops the Gaussian blur, as CIFAR-scale recipes (SimCLR, solo-learn) do: a
    blur of radius up to 2 px erases most of what a 32 px image holds.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {augmentation!r}")
    blur = augmentation == "mocov3"
    return (
        mocov3_view(image_size, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
        mocov3_view(image_size, blur_p=0.1 if blur else 0.0, solarize_p=0.2),
    )


# --------------------------------------------------------------------------------------------
# dataset and sampler


class TwoViewImages(SeededImages):
    """Images under ``root`` (labels ignored), indexed by ``(epoch, index)``, returning ``(view1, view2)``.

    Both views of a sample are drawn from ``(seed, epoch, index)`` alone, and an unreadable image
    is replaced by the next readable one (``mec_hub.data.datasets.SeededImages``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        views: tuple[Callable, Callable],
        *,
        seed: int = 0,
        files: Sequence[str] | None = None,
    ) -> None:
        super().__init__(root, list(files) if files is not None else find_images(root), seed=seed)
        self.views = views

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        _, image = self.open(index)
        return self.draw(epoch, index, lambda x: (self.views[0](x), self.views[1](x)), image)
