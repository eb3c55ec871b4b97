"""Training data: any folder of images, the two MoCo v3 views, and a resumable global-batch sampler.

Exact resumption needs randomness that depends on *what* is computed, not on the history of
the process that computes it: the sampler's order is a function of ``(seed, epoch)``, and each
sample's augmentation is drawn from a generator seeded with ``(seed, epoch, index)``. The same
run therefore sees the same pixels whatever the number of workers, ranks, or restarts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from mec_hub.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from mec_hub.weights.config import IMAGENET_MEAN, IMAGENET_STD

# Unreadable images are replaced by the next readable one; give up after this many in a row.
_MAX_CONSECUTIVE_FAILURES = 50


def derive_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0])


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


class TwoViewImages(Dataset):
    """Images under ``root`` (labels ignored), indexed by ``(epoch, index)``, returning ``(view1, view2)``.

    The augmentation of a sample is a function of ``(seed, epoch, index)`` alone: it is drawn
    inside a forked torch RNG seeded from those three numbers, leaving the caller's RNG as it was.
    Images are decoded as ``mec-embed`` and evaluation decode them
    (``mec_hub.data.images.decode_image``: EXIF orientation applied, transparency over white), so
    that the model is trained on the pixels it is later served. An unreadable image is replaced
    by the next readable one (with a warning once per file, giving the reason), so a bad file
    costs one sample, not the run.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        views: tuple[Callable, Callable],
        *,
        seed: int = 0,
        files: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = list(files) if files is not None else find_images(self.root)
        self.views = views
        self.seed = seed
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, index: int) -> Image.Image:
        for attempt in range(_MAX_CONSECUTIVE_FAILURES):
            path = self.root / self.files[(index + attempt) % len(self.files)]
            try:
                return decode_image(path)
            except ImageDecodeError as exc:
                if str(path) not in self._reported:
                    self._reported.add(str(path))
                    warnings.warn(f"skipping unreadable image {path}: {exc.reason}", stacklevel=2)
        raise RuntimeError(
            f"{_MAX_CONSECUTIVE_FAILURES} unreadable images in a row, from {self.root / self.files[index]} on"
        )

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = self._open(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            return self.views[0](image), self.views[1](image)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch as ``[(epoch, index), ...]``.

    Each epoch is a permutation drawn from ``(seed, epoch)``; global batch ``s`` is its slice
    ``[s*B, (s+1)*B)`` (the incomplete tail is dropped) and rank ``r`` of ``W`` takes the ``r``-th
    of ``W`` equal parts. The global batch is thus the same for any number of ranks, and
    ``set_epoch(epoch, start_step)`` resumes in the middle of an epoch.
    """

    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        if num_samples < global_batch:
            raise ValueError(f"the data has {num_samples} images, fewer than one batch of {global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside an epoch of {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        first = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch + first : step * self.global_batch + first + self.local_batch]
            yield [(self.epoch, i) for i in batch.tolist()]
