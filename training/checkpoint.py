"""Training checkpoints: atomic writes, kept snapshots, and the resume compatibility check.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` reads (tensors, dicts,
lists, str, int, float, bool, None) and that ``mec_hub.export.convert`` understands
(``format == mec_hub.export.convert.TRAIN_FORMAT``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mec_hub.export.convert import TRAIN_FORMAT, read_checkpoint
from mec_hub.fileio import atomic_write

LAST = "checkpoint_last.pt"
SNAPSHOT_PATTERN = re.compile(r"^checkpoint_epoch(\d{4,})\.pt$")
# What defines a run: resuming with any of these changed would not continue the same run. The one
# list: ``pretrain.recipe_config`` writes these keys (each the option of that name) and resume compares them.
RECIPE_KEYS = (
    "arch",
    "model_args",
    "stem",
    "image_size",
    "augmentation",
    "dim",
    "hidden_dim",
    "pred_dim",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "momentum",
    "optimizer",
    "eps2",
    "order",
    "teacher_momentum",
    "warmup_epochs",
    "lamda_warmup_epochs",
    "lamda_warmup_factor",
    "seed",
    "num_images",
)


class ResumeMismatchError(RuntimeError):
    """The command asks for a different run than the one in the output folder's checkpoint."""


def snapshot_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pt"


def save(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """``torch.save`` into a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    if state.get("format") != TRAIN_FORMAT:
        raise ValueError(f"a training checkpoint needs format={TRAIN_FORMAT!r}")
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``)."""
    state = dict(read_checkpoint(path))
    if state.get("format") != TRAIN_FORMAT:
        raise ResumeMismatchError(
            f"{path} is not a checkpoint written by training/pretrain.py (format {state.get('format')!r}); "
            "move it away or use another --output-dir"
        )
    return state


def keep_snapshot(out_dir: str | os.PathLike[str], epoch: int, keep: int) -> Path:
    """Keep the current ``checkpoint_last.pt`` as ``checkpoint_epochNNNN.pt``; prune to the newest ``keep`` (0: all).

    A hard link costs no space or time (``checkpoint_last.pt`` is later replaced by rename, so
    the snapshot keeps the old contents); filesystems without links get a copy.
    """
    out_dir = Path(out_dir)
    last, target = out_dir / LAST, out_dir / snapshot_name(epoch)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, target)
    if keep > 0:
        snapshots = sorted(p for p in out_dir.iterdir() if SNAPSHOT_PATTERN.match(p.name))
        for old in snapshots[:-keep]:
            old.unlink(missing_ok=True)
    return target


def recipe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["--epochs: checkpoint 100, command 200", ...]`` for the recipe keys that differ."""
    out = []
    # Runs from before an option existed used its default.
    defaults = {"augmentation": "mocov3"}
    for key in RECIPE_KEYS:
        if saved.get(key, defaults.get(key)) != current.get(key, defaults.get(key)):
            option = "number of images in --data" if key == "num_images" else "--" + key.replace("_", "-")
            out.append(f"{option}: checkpoint {saved.get(key)!r}, command {current.get(key)!r}")
    return out


def check_resumable(saved_config: Mapping[str, Any], config: Mapping[str, Any], *, path: Path) -> None:
    differences = recipe_differences(saved_config, config)
    if differences:
        raise ResumeMismatchError(
            f"{path} was written by a different run, so it cannot be resumed with this command:\n  "
            + "\n  ".join(differences)
            + "\nRerun with the checkpoint's values to continue it, or pass another --output-dir to start a new run."
        )


def assert_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Fail early, with the key's path, on anything ``torch.load(weights_only=True)`` would refuse."""
    # Exact types: a str or dict subclass (torch.__version__ is one) pickles as its own class.
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}")
            assert_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            assert_weights_only_safe(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) would refuse")
