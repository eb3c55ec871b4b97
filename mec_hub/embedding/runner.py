"""Ordered batches through a model, with decoding ahead of it and recovery from broken decoders.

``BatchRunner.batches(source, start, end)`` embeds ``source[start:end]`` and yields one ``Batch``
per batch, in order; the caller consumes them (writes, checkpoints, counts) in a plain loop. Each
``Batch`` carries ``end``, the index the next batch starts from, which is what a checkpoint records.

Decoding runs in DataLoader worker processes (``loader.py``). If one of them dies or stalls (a
file that crashes or hangs the decoder), the batch after the last commit is decoded again one
file per process, the culprit becomes a failure, and the run goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mec_hub.embedding.loader import (
    Collate,
    ImageSource,
    decode_isolated,
    is_worker_failure,
    make_loader,
    worker_deaths_deferred,
)


@dataclass(frozen=True)
class Batch:
    """One committed batch: ``features[i]`` is item ``indices[i]``; ``failures`` are ``(index, reason)``
    of the items that could not be read; ``end`` is one past its last item (embedded or failed)."""

    indices: list[int]
    failures: list[tuple[int, str]]
    features: np.ndarray
    end: int


@contextlib.contextmanager
def device_settings(device: torch.device) -> Iterator[None]:
    """Global settings for a run on ``device``, restored after it: cuDNN autotuning for fixed-size batches."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass
class BatchRunner:
    """Runs ``forward`` over the items of an ``ImageSource`` in consecutive batches.

    ``forward`` maps preprocessed ``(N, 3, H, W)`` images to ``(N, D)`` features on ``device``
    (it may return before the device is done); ``finish`` turns them, or ``None`` for a batch with
    no readable image, into the NumPy rows to commit.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor | None], np.ndarray]
    device: torch.device
    batch_size: int
    num_workers: int
    input_size: Sequence[int]
    decode_threads: int = 1
    worker_niceness: int = 0

    def batches(self, source: ImageSource, start: int, end: int) -> Iterator[Batch]:
        """Embed ``source[start:end]`` in order, yielding one ``Batch`` per batch.

        A batch counts as taken once the consumer asks for the next one: if a decoding worker
        dies, decoding restarts after the last batch taken. While the consumer holds a batch
        (writing it, checkpointing), a worker's death is not delivered, so it cannot interrupt
        that work half-way; the consumer should not keep a batch long (the workers wait).
        """
        source.threads = self.decode_threads
        position = start
        with device_settings(self.device):
            while position < end:
                loader = make_loader(
                    source,
                    start=position,
                    end=end,
                    batch_size=self.batch_size,
                    num_workers=self.num_workers,
                    input_size=self.input_size,
                    pin_memory=self.device.type == "cuda",
                    niceness=self.worker_niceness,
                )
                through_model = self._through_model(loader)
                try:
                    for batch in through_model:
                        with worker_deaths_deferred():
                            yield batch
                            position = batch.end  # inside: a death delivered on leaving must not re-run it
                    continue
                except RuntimeError as exc:
                    if self.num_workers == 0 or not is_worker_failure(exc):
                        raise
                finally:
                    through_model.close()
                if position >= end:
                    break
                stop = min(position + self.batch_size, end)
                isolated = decode_isolated(source, range(position, stop), Collate(self.input_size))
                for batch in self._through_model([isolated]):
                    with worker_deaths_deferred():
                        yield batch
                        position = batch.end

    def _through_model(
        self, loader: Iterable[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]
    ) -> Iterator[Batch]:
        """The loader's batches through the model, in order.

        On CUDA the next batch is queued on the GPU before the previous one is copied back, so
        the GPU is not idle while the host writes results.
        """
        pending: tuple[list[int], list[tuple[int, str]], Any] | None = None
        lag = self.device.type == "cuda"
        for indices, images, failures in loader:
            features = self.forward(images) if indices else None
            if not lag:
                yield self._batch(indices, failures, features)
                continue
            if pending is not None:
                yield self._batch(*pending)
            pending = (indices, failures, features)
        if pending is not None:
            yield self._batch(*pending)

    def _batch(self, indices: list[int], failures: list[tuple[int, str]], features: torch.Tensor | None) -> Batch:
        # Every item of a batch is either embedded or failed, so the batch ends after the larger of the two.
        end = max(indices + [index for index, _ in failures]) + 1
        return Batch(indices, failures, self.finish(features), end)
