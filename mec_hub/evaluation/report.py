"""The JSON report of an evaluation (``mec-hub eval ... --out R.json``): one type, one schema.

The keys, their order and their nesting are a file format: ``benchmarks/bundled_model/*.json``
and the metrics quoted in the model registry are such reports. Add keys, never rename them.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mec_hub import __version__
from mec_hub.fileio import atomic_write_text


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class EvalReport:
    """What one evaluation measured, with what it ran on.

    ``results``: ``{"top1": %, "top5": %}``. ``params``: the protocol's settings (and, for the
    linear probe, its weight-decay sweep). ``model``: what made the features (name, weights,
    SHA-256, head, ...). ``data``: the inputs (folders or feature files, counts, skipped images)
    and the class list. ``seconds``: time per stage. ``argv``: the command line, when there was one.
    """

    protocol: str
    results: dict[str, float]
    params: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    seconds: dict[str, float]
    device: str
    mec_hub_version: str = __version__
    created: str = field(default_factory=_now)
    argv: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values, keys in the file's order; seconds to the millisecond."""
        return {
            "protocol": self.protocol,
            "results": self.results,
            "params": self.params,
            "model": self.model,
            "data": self.data,
            "seconds": {stage: round(value, 3) for stage, value in self.seconds.items()},
            "device": self.device,
            "mec_hub_version": self.mec_hub_version,
            "created": self.created,
            "argv": list(self.argv),
        }

    def to_json(self) -> str:
        """The text of a report file: indented by 2, ending in a newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_json()`` to ``path`` atomically (a reader never sees half a report)."""
        return atomic_write_text(path, self.to_json())
