"""How far a run is and how fast it goes: elapsed time, ETA, throughput split into data wait and compute.

Two pieces, both used by ``training/pretrain.py``:

* :class:`TrainLog` keeps what the run prints: while it is active, everything written to stdout
  also goes to ``OUT/train.log`` (appended, so a resumed run continues the same file), warnings
  are copied there as ``warning: ...`` lines, and an exception that ends the run as an
  ``error: ...`` line, so the file tells the whole story of a run that lasted days.
* :class:`Progress` times the loop. Within a logging window it adds up the time spent waiting
  for the data loader (``next()`` on it) and counts the rest of the window as compute (the step
  itself, and the device sync when the window's statistics are read back), leaving out what is
  done under :meth:`Progress.paused` (checkpoints, the kNN monitor). Images/s are the window's
  images over that time, so a checkpoint no longer makes the next window look slow, and a data
  loader that cannot keep up shows as a data wait close to the whole step. The ETA is the
  remaining steps at this process's mean pace so far, pauses included (they recur). When stderr
  is a terminal, a tqdm bar shows the epoch's steps.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

TRAIN_LOG = "train.log"

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``1:02:05``; ``2 days`` -> ``2d 00:00:00``; not finite -> ``?``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


# --------------------------------------------------------------------------------------------
# train.log


class _Tee(io.TextIOBase):
    """A text stream that writes to ``primary`` and to the log (a stand-in for ``sys.stdout``)."""

    def __init__(self, primary: TextIO, log: TrainLog) -> None:
        super().__init__()
        self._primary, self._log = primary, log
        self._pending = ""  # the start of a line (print writes its parts and the newline separately)

    def write(self, text: str) -> int:
        self._log.write(text)
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._emit(lines + "\n")
        return len(text)

    def _emit(self, text: str) -> None:
        # A bar on the terminal's stderr is cleared while whole lines are printed, and redrawn below them.
        with tqdm.external_write_mode(file=sys.stderr):
            self._primary.write(text)
            self._primary.flush()

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""
        self._primary.flush()
        self._log.flush()

    def isatty(self) -> bool:
        return self._primary.isatty()

    def fileno(self) -> int:
        return self._primary.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._primary, "encoding", "utf-8")


class TrainLog(contextlib.AbstractContextManager):
    """While active: stdout is also appended to ``path``, and so are warnings and the error that ends the block.

    The file is opened at the first write, in the folder the run has made by then (an error
    before the output folder exists creates nothing). ``enabled=False`` (the processes other
    than the main one) does nothing.
    """

    def __init__(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: TextIO | None = None
        self._stdout: TextIO | None = None
        self._showwarning: Callable[..., Any] | None = None

    def write(self, text: str) -> None:
        if self._file is None:
            if not self.path.parent.is_dir():
                return
            self._file = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed in __exit__)
        self._file.write(text)
        if "\n" in text:
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def __enter__(self) -> TrainLog:
        if not self.enabled:
            return self
        self._stdout = sys.stdout
        sys.stdout = _Tee(sys.stdout, self)  # type: ignore[assignment]
        self._showwarning = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            self.write(f"warning: {category.__name__}: {message}\n")
            assert self._showwarning is not None
            self._showwarning(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.enabled or self._stdout is None:
            return
        if exc is not None and not isinstance(exc, SystemExit):
            self.write(f"error: {type(exc).__name__}: {exc}\n")
        sys.stdout.flush()
        sys.stdout = self._stdout
        warnings.showwarning = self._showwarning  # type: ignore[assignment]
        self._stdout = self._showwarning = None
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class WindowTiming:
    """The timing of one logging window, as the log line and ``metrics.jsonl`` show it."""

    steps: int
    images_per_s: float
    """The window's images over its data wait plus compute (pauses left out)."""
    data_time_s: float
    """Mean seconds per step spent waiting for the data loader."""
    compute_time_s: float
    """Mean seconds per step spent on everything else (forward, backward, update, reading back stats)."""
    elapsed_s: float
    """Seconds since this process started training."""
    epoch_time_s: float
    """Seconds since the current epoch started in this process."""
    eta_s: float
    """Seconds to the run's last step at this process's mean pace so far (NaN before the first step)."""

    def record(self) -> dict[str, float]:
        """The fields ``metrics.jsonl`` holds (the window's step count is implied by the steps logged)."""
        return {
            "images_per_s": self.images_per_s,
            "data_time_s": self.data_time_s,
            "compute_time_s": self.compute_time_s,
            "elapsed_s": self.elapsed_s,
            "eta_s": self.eta_s,
        }

    def text(self) -> str:
        return (
            f"{self.images_per_s:.1f} img/s (data {self.data_time_s:.3f} + compute {self.compute_time_s:.3f} s/step) "
            f"elapsed {format_duration(self.elapsed_s)} epoch {format_duration(self.epoch_time_s)} "
            f"ETA {format_duration(self.eta_s)}"
        )


class Progress:
    """Times the training loop of one process from ``start_step`` to ``stop`` (see the module docstring).

    Use::

        for batch in progress.batches(loader, epoch):   # times the data wait, draws the bar
            ...one step...
            progress.step_done()
            if logged: timing = progress.window()
            with progress.paused(): save()               # left out of images/s
    """

    def __init__(
        self,
        *,
        start_step: int,
        stop: int,
        steps_per_epoch: int,
        epochs: int,
        batch_size: int,
        bar: bool | None = None,
        bar_file: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.step, self.start_step, self.stop = start_step, start_step, stop
        self.steps_per_epoch, self.epochs, self.batch_size = steps_per_epoch, epochs, batch_size
        self._bar_file = bar_file if bar_file is not None else sys.stderr
        self.bar_enabled = self._bar_file.isatty() if bar is None else bar
        self._clock = clock
        self._start = self._window_start = self._epoch_start = clock()
        self._window_first = start_step
        self._window_data = self._window_paused = 0.0
        self._bar: Any = None

    def batches(self, loader: Iterable[T], epoch: int) -> Iterator[T]:
        """The loader's batches of ``epoch`` (0-based), timing each wait; a bar of the epoch when enabled."""
        self._epoch_start = self._clock()
        if self.bar_enabled:
            self._bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step - epoch * self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                file=self._bar_file,
                dynamic_ncols=True,
                leave=False,
            )
        iterator = iter(loader)
        try:
            while True:
                asked = self._clock()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self._window_data += self._clock() - asked
                yield batch
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def step_done(self) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is left out of the window's images/s and compute time (not of elapsed or ETA)."""
        started = self._clock()
        try:
            yield
        finally:
            self._window_paused += self._clock() - started

    def window(self) -> WindowTiming:
        """The timing of the steps since the last window, and the start of the next one."""
        now = self._clock()
        steps = self.step - self._window_first
        busy = now - self._window_start - self._window_paused
        per_step = max(steps, 1)
        done = self.step - self.start_step
        elapsed = now - self._start
        timing = WindowTiming(
            steps=steps,
            images_per_s=steps * self.batch_size / busy if busy > 0 else math.nan,
            data_time_s=self._window_data / per_step,
            compute_time_s=(busy - self._window_data) / per_step,
            elapsed_s=elapsed,
            epoch_time_s=now - self._epoch_start,
            eta_s=(self.stop - self.step) * elapsed / done if done > 0 else math.nan,
        )
        self._window_start, self._window_first = now, self.step
        self._window_data = self._window_paused = 0.0
        if self._bar is not None:
            self._bar.set_postfix_str(f"{timing.images_per_s:.0f} img/s, run ETA {format_duration(timing.eta_s)}")
        return timing
