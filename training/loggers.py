"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

Each logger gets the records ``training.metrics.MetricsLog`` writes to ``metrics.jsonl`` and logs
their numbers (the same names, under ``train/`` for the log lines, ``epoch/`` for the epoch
summaries, ``<kind>/`` otherwise) at the record's ``step``; a value JSON cannot hold (NaN, inf)
is left out, as ``metrics.jsonl`` writes it as null. Both are optional extras:
``pip install "mec-hub[train]"`` installs TensorBoard; W&B is ``pip install wandb``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mec_hub.errors import MecHubError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
NOT_SCALARS = ("step", "epoch", "kind")


class LoggerUnavailableError(MecHubError):
    """A logger was asked for but its package is not installed (one line, with the install command)."""


class ScalarLogger(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of a metrics record: its finite numbers, tagged ``<kind>/<name>`` (``train/`` for steps)."""
    kind = record.get("kind", "step")
    prefix = "train/" if kind == "step" else f"{kind}/"
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[prefix + key] = float(value)
    return out


class TensorBoardLogger:
    """Event files in ``OUT/tensorboard``; a (re)started run drops the events after its checkpoint's step.

    As for ``metrics.jsonl``: the steps after the checkpoint are about to be redone, and a run that
    restarts from step 0 (killed before its first checkpoint) drops them all.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1)

    @classmethod
    def if_installed(cls, out_dir: str | os.PathLike[str], *, resume_step: int) -> TensorBoardLogger | None:
        """The logger, or ``None`` when tensorboard is not installed (it is an optional extra)."""
        try:
            return cls(out_dir, resume_step=resume_step)
        except ImportError:
            return None

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A W&B run in ``project``; the run's id is kept in ``OUT/wandb_run_id.txt``, so a resumed run continues it.

    W&B keeps a run's steps increasing: the steps a resumed run logs again (those after the
    checkpoint's step that the interrupted run had logged) keep their first values there.
    """

    def __init__(
        self, project: str, out_dir: str | os.PathLike[str], *, config: Mapping[str, Any], name: str | None = None
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise LoggerUnavailableError(
                f"--wandb {project}: Weights & Biases is not installed; pip install wandb (or drop --wandb)"
            ) from None
        id_file = Path(out_dir) / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
        if not run_id:
            run_id = wandb.util.generate_id()
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._run = wandb.init(
            project=project, id=run_id, resume="allow", dir=str(out_dir), config=dict(config), name=name
        )

    def write(self, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()
