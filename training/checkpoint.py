"""Training checkpoints: atomic writes, kept snapshots, the resume check, and the weights a run starts from.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` reads (tensors, dicts,
lists, str, int, float, bool, None) and that ``mec_hub.export.convert`` understands
(``format == mec_hub.weights.checkpoint.TRAIN_FORMAT``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mec_hub.export.convert import extract_weights
from mec_hub.fileio import atomic_write
from mec_hub.models.loading import load as load_encoder
from mec_hub.models.losses import PAPER_EPS2
from mec_hub.weights.checkpoint import TRAIN_FORMAT, read_checkpoint
from training.config import recipe_keys, scaled_eps2

LAST = "checkpoint_last.pt"
SNAPSHOT_PATTERN = re.compile(r"^checkpoint_epoch(\d{4,})\.pt$")
# What defines a run: resuming with any of these changed would not continue the same run. The
# recipe fields of ``TrainConfig`` (each the option of that name) and the number of images.
RECIPE_KEYS = (*recipe_keys(), "num_images")


class ResumeMismatchError(RuntimeError):
    """The command asks for a different run than the one in the output folder's checkpoint."""


def snapshot_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pt"


def save(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """``torch.save`` into a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    if state.get("format") != TRAIN_FORMAT:
        raise ValueError(f"a training checkpoint needs format={TRAIN_FORMAT!r}")

    def write(tmp: Path) -> None:
        # Our own file object: given a path, torch reports a failed write (a full disk) as a bare
        # RuntimeError from its C++ writer; given a file, the OSError (ENOSPC) comes through.
        with open(tmp, "wb") as fh:
            torch.save(dict(state), fh)

    return atomic_write(path, write)


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


def total_epochs(config: Mapping[str, Any]) -> int:
    """The length of a run's schedule: its ``--extend-epochs`` when it was extended, else ``--epochs``."""
    extended = config.get("extend_epochs")
    return int(extended) if extended is not None else int(config["epochs"])


def recipe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["--epochs: checkpoint 100, command 200", ...]`` for the recipe keys that differ.

    The schedule may grow (``--extend-epochs`` beyond the checkpoint's length), never shrink.
    """
    out = []
    # Runs from before an option existed used its default.
    defaults = {"augmentation": "mocov3"}
    for key in RECIPE_KEYS:
        if saved.get(key, defaults.get(key)) != current.get(key, defaults.get(key)):
            option = "number of images in --data" if key == "num_images" else "--" + key.replace("_", "-")
            out.append(f"{option}: checkpoint {saved.get(key)!r}, command {current.get(key)!r}")
            if key == "epochs" and current[key] > saved[key]:
                longer = f"keep --epochs {saved[key]} and add --extend-epochs {current[key]}"
                out[-1] += f" (to make this run longer, {longer})"
            if key == "eps2" and saved[key] == scaled_eps2(saved["batch_size"]) != PAPER_EPS2:
                out[-1] += (
                    " (runs that did not pass --eps2 used 64 x 1024 / batch below a batch of 1024 before the "
                    "default became the paper's 64: pass --eps2 scaled to continue this one)"
                )
    if not out and total_epochs(current) < total_epochs(saved):
        out.append(
            f"--extend-epochs: checkpoint {saved.get('extend_epochs')!r}, command {current.get('extend_epochs')!r} "
            f"(the run was extended to {total_epochs(saved)} epochs; a schedule can grow, not shrink)"
        )
    return out


def check_resumable(saved_config: Mapping[str, Any], config: Mapping[str, Any], *, path: Path) -> None:
    """Refuse a command that asks for another run than the checkpoint's (one that extends it is the same run)."""
    differences = recipe_differences(saved_config, config)
    if differences:
        raise ResumeMismatchError(
            f"{path} was written by a different run, so it cannot be resumed with this command:\n  "
            + "\n  ".join(differences)
            + "\nRerun with the checkpoint's values to continue it, or pass another --output-dir to start a new run."
        )


def schedule_restart(saved_config: Mapping[str, Any], config: Mapping[str, Any], *, step: int) -> dict[str, int] | None:
    """The restart record when ``config`` extends the checkpoint's schedule (after :func:`check_resumable`).

    ``{"step", "from_epochs", "to_epochs"}``: from ``step`` on, the schedules are those of a
    ``to_epochs`` run (the rule: ``training.schedules``).
    """
    before, after = total_epochs(saved_config), total_epochs(config)
    if after == before:
        return None
    return {"step": int(step), "from_epochs": before, "to_epochs": after}


@dataclass(frozen=True)
class InitialWeights:
    """What ``--init-from`` gives a new run: the student's backbone (and projector) and their architecture."""

    architecture: str | None
    """``None`` when the source does not say (a plain state dict): the strict load then decides."""
    model_args: dict[str, Any]
    stem: str
    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None
    source: str
    """What the weights are, for the log and the config: ``student of a training checkpoint at step 6``."""


def read_initial_weights(spec: str) -> InitialWeights:
    """The student weights in ``spec``: a checkpoint file, or anything ``mec_hub.load`` accepts.

    A file other than ``.safetensors`` is read as a checkpoint (``torch.load(weights_only=True)``):
    a ``training/pretrain.py`` one (its student), the authors' one (its encoder), or a plain
    backbone state dict. Anything else goes to ``mec_hub.load``, which checks digests: a
    registry name, an exported folder, a ``.safetensors`` file, ``hf-hub:org/name``.
    """
    path = Path(spec)
    if path.is_file() and path.suffix != ".safetensors":
        state = read_checkpoint(path)
        extracted = extract_weights(state, source="student", origin=spec)
        if state.get("format") == TRAIN_FORMAT:
            source = f"student of a training checkpoint at step {state.get('step')}"
        else:
            source = extracted.layout
        known = extracted.layout != "plain state dict"
        return InitialWeights(
            architecture=extracted.architecture if known else None,
            model_args=dict(extracted.model_args),
            stem=extracted.stem,
            backbone=extracted.backbone,
            projector=extracted.projector,
            source=source,
        )
    encoder = load_encoder(weights=spec, head="backbone")
    projector = None
    if encoder.config.projector is not None:
        encoder = load_encoder(weights=spec, head="projector")
        projector = encoder.projector.state_dict()
    digest = f", sha256 {encoder.weights_sha256[:12]}" if encoder.weights_sha256 else ""
    return InitialWeights(
        architecture=encoder.config.architecture,
        model_args=dict(encoder.config.model_args),
        stem=encoder.config.stem,
        backbone=encoder.backbone.state_dict(),
        projector=projector,
        source=f"mec_hub.load weights{digest}",
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
