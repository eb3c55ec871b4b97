"""Image datasets for training loops that resume exactly, and the sampler that feeds them global batches.

Exact resumption needs randomness that depends on *what* is computed, not on the history of the
process that computes it: the sampler's order is a function of ``(seed, epoch)``, and each
sample's augmentation is drawn from a generator seeded with ``(seed, epoch, index)``. A run
therefore sees the same pixels whatever the number of workers, ranks, or restarts. MEC
pretraining (``training/data.py``) and the supervised evaluations (the paper's linear protocol,
semi-supervised fine-tuning: ``mec_hub.evaluation.supervised``) both build on these.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from mec_hub.data.images import ImageDecodeError, decode_image

# Unreadable images are replaced by the next readable one; give up after this many in a row.
MAX_CONSECUTIVE_FAILURES = 50


def derive_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0])


class SeededImages(Dataset):
    """Images ``root / files[i]`` indexed by ``(epoch, index)``; subclasses say what a sample is.

    Images are decoded as ``mec-embed`` and evaluation decode them
    (``mec_hub.data.images.decode_image``: EXIF orientation applied, transparency over white), so
    that a model is trained on the pixels it is later served. An unreadable image is replaced by
    the next readable one (with a warning once per file, giving the reason), so a bad file costs
    one sample, not the run. :meth:`draw` runs a random transform inside a forked torch RNG seeded
    from ``(seed, epoch, index)``, leaving the caller's RNG as it was.
    """

    def __init__(self, root: str | os.PathLike[str], files: Sequence[str], *, seed: int = 0) -> None:
        if not files:
            raise ValueError(f"{root}: no images")
        self.root = Path(root)
        self.files = list(files)
        self.seed = seed
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def open(self, index: int) -> tuple[int, Image.Image]:
        """``(index actually read, image)``: ``index``, or the next readable one after it."""
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            actual = (index + attempt) % len(self.files)
            path = self.root / self.files[actual]
            try:
                return actual, decode_image(path)
            except ImageDecodeError as exc:
                if str(path) not in self._reported:
                    self._reported.add(str(path))
                    warnings.warn(f"skipping unreadable image {path}: {exc.reason}", stacklevel=2)
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row, from {self.root / self.files[index]} on"
        )

    def draw(self, epoch: int, index: int, transform: Callable[[Image.Image], Any], image: Image.Image) -> Any:
        """``transform(image)`` with the random draws of sample ``(epoch, index)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            return transform(image)


class LabelledImages(SeededImages):
    """``(image tensor, label)`` per ``(epoch, index)``: a labelled image list with one random transform.

    ``labels[i]`` is the class index of ``files[i]``; an unreadable image's replacement brings its
    own label. Augmentations are functions of ``(seed, epoch, index)`` (see :class:`SeededImages`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        files: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(root, files, seed=seed)
        if len(labels) != len(self.files):
            raise ValueError(f"{len(labels)} labels for {len(self.files)} images")
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        actual, image = self.open(index)
        return self.draw(epoch, index, self.transform, image), self.labels[actual]


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch as ``[(epoch, index), ...]``.

    Each epoch is a permutation drawn from ``(seed, epoch)``; global batch ``s`` is its slice
    ``[s*B, (s+1)*B)`` and rank ``r`` of ``W`` takes part ``r`` of ``W`` contiguous parts of it
    (``[r*b//W, (r+1)*b//W)`` of a batch of ``b``). The global batch is thus the same for any
    number of ranks, and ``set_epoch(epoch, start_step)`` resumes in the middle of an epoch.
    ``drop_last``: drop the incomplete last batch (pretraining, where the loss needs the global
    batch m), or keep it as a smaller step (the supervised evaluations, as PyTorch's ImageNet
    example and the authors' linear evaluation do); then a data set smaller than one batch is
    one step per epoch, and ranks may hold unequal shares of the last batch (a tail of fewer
    images than ranks, which would leave a rank with nothing, is dropped).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        if num_samples < (global_batch if drop_last else world_size):
            raise ValueError(f"the data has {num_samples} images, fewer than one batch of {global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.drop_last = drop_last
        self.local_batch = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, tail = divmod(self.num_samples, self.global_batch)
        return full + (not self.drop_last and tail >= self.world_size)

    def batch_size(self, step: int) -> int:
        """The global batch size of step ``step`` of an epoch (smaller for a kept incomplete last batch)."""
        return min(self.global_batch, self.num_samples - step * self.global_batch)

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
        for step in range(self.start_step, self.steps_per_epoch):
            start, size = step * self.global_batch, self.batch_size(step)
            first = start + self.rank * size // self.world_size
            last = start + (self.rank + 1) * size // self.world_size
            yield [(self.epoch, i) for i in order[first:last].tolist()]
