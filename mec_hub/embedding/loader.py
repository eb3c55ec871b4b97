"""Decode and preprocess images in DataLoader workers, ahead of the model, never failing a batch.

A sample that cannot be read comes back as its reason (a string) instead of a tensor; the
collate function sets those aside, so a batch is (indices of the good samples, their stacked
tensors, [(index, reason), ...]) and a bad file never reaches the model, stops the run or shifts
a row.

Worse than an exception, a file can crash the decoder (a bug in a C library: the worker process
dies) or make it hang. Then the batch is decoded again one file per fresh process
(``decode_isolated``) with a time limit, and the file that kills or stalls its process is the
failure. The limit is ``MEC_HUB_DECODE_TIMEOUT`` seconds (default 600) of waiting for a batch,
or for one file.

No decoding process outlives the process that started it: on Linux each asks the kernel to
SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``), so a kill -9 of a run takes its workers
along, even one stuck in a decoder. (Elsewhere, DataLoader workers notice a dead parent between
two batches.)
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mec_hub.data.featurefile import path_name_problem
from mec_hub.data.images import ImageDecodeError, decode_image, decode_image_bytes, prepare_image
from mec_hub.embedding.inputs import TarMember

Sample = tuple[int, "torch.Tensor | str"]
Batch = tuple[list[int], torch.Tensor, list[tuple[int, str]]]

DECODE_TIMEOUT_ENV = "MEC_HUB_DECODE_TIMEOUT"
DEFAULT_DECODE_TIMEOUT = 600.0


def decode_timeout() -> float:
    return float(os.environ.get(DECODE_TIMEOUT_ENV) or DEFAULT_DECODE_TIMEOUT)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ``parent_pid`` dies (Linux; elsewhere nothing).

    Called first thing in a decoding process. If the parent is already gone (it died before the
    request took effect), this process ends at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no C library to call: the DataLoader's own watchdog remains
        return
    if os.getppid() != parent_pid:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:  # the parent died already
            os.kill(os.getpid(), signal.SIGKILL)
        except OSError:
            pass


def usable_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        with contextlib.suppress(OSError):
            return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class StringTable(Sequence[str]):
    """Many strings packed in one bytes object, read back one at a time.

    A list of a million path strings is a million Python objects; forked DataLoader workers that
    touch them (reference counts) copy the pages they live on, and each worker's memory grows
    towards a full copy of the list. One bytes buffer and an offsets array avoid that.
    """

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [os.fsencode(s) for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return os.fsdecode(self._data[self._offsets[index] : self._offsets[index + 1]])


class ImageSource(Dataset):
    """Items (paths or PIL images) -> ``(index, tensor)``, or ``(index, reason)`` when unreadable."""

    def __init__(
        self,
        items: Sequence[str | os.PathLike[str] | Image.Image],
        transform: Callable[[Any], Any],
        names: Sequence[str] | None = None,
    ) -> None:
        self.items = items
        self.transform = transform
        self.names = names
        self.threads = 1  # decoding threads per process, for __getitems__
        self._pool: Any = None
        self._pool_pid = -1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        problem = None if self.names is None else path_name_problem(self.names[index])
        if problem:
            return index, problem
        try:
            image = prepare_image(item) if isinstance(item, Image.Image) else _decode_item(item)
        except ImageDecodeError as exc:
            return index, exc.reason
        except Exception as exc:  # never let one file stop the run
            return index, f"cannot decode image ({type(exc).__name__}: {exc})"
        try:
            return index, self.transform(image)
        except Exception as exc:
            return index, f"preprocessing failed ({type(exc).__name__}: {exc})"

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """A whole batch, decoded by ``self.threads`` threads (Pillow and torch release the GIL)."""
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None or self._pool_pid != os.getpid():  # a forked worker needs its own threads
            self._pool, self._pool_pid = ThreadPoolExecutor(self.threads, "mec-decode"), os.getpid()
        return list(self._pool.map(self.__getitem__, indices))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None, "_pool_pid": -1}


def _decode_item(item: str | os.PathLike[str]) -> Image.Image:
    """A file path, or a reference to a tar member (``TarMember``), decoded."""
    member = TarMember.parse(item) if isinstance(item, str) else None
    return decode_image(item) if member is None else decode_image_bytes(member.read())


class Collate:
    """Stack the good samples; keep the failures, with their indices, out of the tensor."""

    def __init__(self, input_size: Sequence[int]) -> None:
        self.empty_shape = (0, *input_size)

    def __call__(self, samples: list[Sample]) -> Batch:
        indices, tensors, failures = [], [], []
        for index, value in samples:
            if isinstance(value, str):
                failures.append((index, value))
            else:
                indices.append(index)
                tensors.append(value)
        images = torch.stack(tensors) if tensors else torch.empty(self.empty_shape)
        return indices, images, failures


class _WorkerInit:
    """Per-worker setup: dies with its parent, one torch thread, lower priority, the main process's pixel limit."""

    def __init__(self, max_pixels: int | None, niceness: int) -> None:
        self.max_pixels = max_pixels
        self.niceness = niceness
        self.parent_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
        torch.set_num_threads(1)
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        if self.niceness and hasattr(os, "nice"):
            with contextlib.suppress(OSError):
                os.nice(self.niceness)


class OrderedBatches(torch.utils.data.Sampler[list[int]]):
    """Consecutive batches of ``range(start, end)``: batch k is always items ``start+k*B ...``."""

    def __init__(self, start: int, end: int, batch_size: int) -> None:
        self.start, self.end, self.batch_size = start, end, batch_size

    def __len__(self) -> int:
        return -(-(self.end - self.start) // self.batch_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for first in range(self.start, self.end, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.end)))


class _DataLoader(DataLoader):
    """torch's DataLoader, without its warning about more workers than CPUs: torch gives it when
    the loader is made and again each time it is iterated; ``make_loader`` gives its own, once."""

    def check_worker_number_rationality(self) -> None:
        return


def _warn_if_too_many_workers(num_workers: int) -> None:
    cpus = usable_cpus()
    if num_workers > cpus:
        # One place, one text: Python's default warning filter shows it once, however many loaders.
        warnings.warn(
            f"decoding with {num_workers} worker processes on {cpus} CPU(s) slows the run down; "
            f"use at most {cpus} (--num-workers, or num_workers=)",
            UserWarning,
            stacklevel=3,
        )


def make_loader(
    source: ImageSource,
    *,
    start: int,
    end: int,
    batch_size: int,
    num_workers: int,
    input_size: Sequence[int],
    pin_memory: bool,
    niceness: int = 0,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Batches of ``source[start:end]`` in order, decoded by ``num_workers`` processes ahead of use
    (``niceness`` lowers their CPU priority; 0 workers: decoded in this process)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        _warn_if_too_many_workers(num_workers)
        kwargs.update(
            prefetch_factor=prefetch_factor,
            worker_init_fn=_WorkerInit(Image.MAX_IMAGE_PIXELS, niceness),
            persistent_workers=False,
            timeout=decode_timeout(),
        )
    return _DataLoader(
        source,
        batch_sampler=OrderedBatches(start, end, batch_size),
        num_workers=num_workers,
        collate_fn=Collate(input_size),
        pin_memory=pin_memory,
        **kwargs,
    )


def is_worker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the DataLoader's report of a worker that died or a batch that never came."""
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("DataLoader worker" in message or "DataLoader timed out" in message)


def _decode_in_child(source: ImageSource, connection: Any, max_pixels: int | None, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = max_pixels
    _, value = source[0]
    # As plain pickled data: torch's own tensor pickling would pass a shared-memory handle that
    # dies with this process.
    connection.send(value if isinstance(value, str) else value.numpy())
    connection.close()


def decode_one_isolated(source: ImageSource, index: int) -> Sample:
    """``source[index]`` decoded in a process of its own; its death or a hang is that item's failure."""
    timeout = decode_timeout()
    names = None if source.names is None else [source.names[index]]
    single = ImageSource([source.items[index]], source.transform, names)
    context = multiprocessing.get_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_decode_in_child, args=(single, sender, Image.MAX_IMAGE_PIXELS, os.getpid()), daemon=True
    )
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            try:
                value = receiver.recv()
                return index, value if isinstance(value, str) else torch.from_numpy(value)
            except EOFError:  # the process died before answering
                pass
        else:
            process.kill()
            return index, f"decoding did not finish within {timeout:g} s (a malformed file that hangs the decoder?)"
    finally:
        receiver.close()
        process.join()
    return index, f"the decoder crashed on this file (its process died, {_exit_description(process.exitcode)})"


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def decode_isolated(source: ImageSource, indices: Iterable[int], collate: Collate) -> Batch:
    """Decode each item in a fresh process of its own; a crash or hang fails that item alone."""
    return collate([decode_one_isolated(source, index) for index in indices])


@contextlib.contextmanager
def worker_deaths_deferred() -> Iterator[None]:
    """Hold back SIGCHLD (through which the DataLoader reports a dead worker, raising wherever the
    main thread happens to be) for the duration of the block, so that the report arrives between
    two checkpoints, never inside one."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
