"""``OUT/metrics.jsonl`` (one JSON object per line) and, when installed, TensorBoard.

A resumed run first drops the lines logged after its checkpoint's step (they belong to the
part of the run that is about to be redone), so the file never has a step twice or a gap.
Lines for step ``s`` are always written before the checkpoint of step ``s``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mec_hub.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a kill mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf: write them as null rather than invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (only on the main process) and mirrors scalars to TensorBoard."""

    def __init__(
        self, out_dir: str | os.PathLike[str], *, resume_step: int, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

    @property
    def tensorboard_active(self) -> bool:
        return self._writer is not None

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if self._writer is not None:
            prefix = "epoch/" if record.get("kind") == "epoch" else "train/"
            for key, value in record.items():
                if key in ("step", "epoch", "kind") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self._writer.add_scalar(prefix + key, value, global_step=int(record["step"]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
