"""``OUT/metrics.jsonl`` (one JSON object per line), mirrored to TensorBoard and W&B when asked for.

A resumed run first drops the lines logged after its checkpoint's step (they belong to the
part of the run that is about to be redone), so the file never has a step twice or a gap, and
then writes a ``{"kind": "resume", "step": S, "time": ...}`` line, so that plots can mark where
the run was restarted. Lines for step ``s`` are always written before the checkpoint of step ``s``.

Record kinds: ``step`` (one per log line: the window's loss statistics, schedule values,
throughput and timing, and the Taylor fidelity on the steps that measure it), ``epoch`` (the
epoch's summary), ``knn`` (a kNN measurement off an epoch end) and ``resume``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mec_hub.fileio import atomic_write_text, read_json_lines
from training.loggers import ScalarLogger, TensorBoardLogger, WandbLogger

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a kill mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for _, record in read_json_lines(path):
        if isinstance(record, dict):  # a torn or blank line is not a record
            records.append(record)
    return records


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf: write them as null rather than invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (only on the main process) and hands them to the loggers.

    ``tensorboard``: also write TensorBoard events when the package is installed
    (``tensorboard_active`` tells whether it is). ``wandb``: a W&B project to log to (an error
    naming the package when it is not installed); ``run_config`` is the run's config it records.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        resume_step: int,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: str | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self.loggers: list[ScalarLogger] = []
        self._tensorboard: TensorBoardLogger | None = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if wandb is not None:
            self.loggers.append(WandbLogger(wandb, out_dir, config=run_config or {}, name=Path(out_dir).name))
        if tensorboard:
            self._tensorboard = TensorBoardLogger.if_installed(out_dir, resume_step=resume_step)
            if self._tensorboard is not None:
                self.loggers.append(self._tensorboard)
        last = kept[-1] if kept else {}
        if resume_step > 0 and not (last.get("kind") == "resume" and last.get("step") == resume_step):
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self._append({"kind": "resume", "step": resume_step, "time": now})

    @property
    def tensorboard_active(self) -> bool:
        return self._tensorboard is not None

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(record)
        for logger in self.loggers:
            logger.write(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
        self._tensorboard = None
