"""The pretraining options as one typed record: ``TrainConfig``, its YAML files and its command line.

Every option of ``training/pretrain.py`` is a field of :class:`TrainConfig`; its default is the
paper's recipe and its metadata holds the help text, the option names (``-b`` and
``--batch-size`` for ``batch_size``) and whether resuming compares it (``recipe``). The
argparse parser is generated from the fields, and so are the keys a resume compares
(``recipe_keys``, read by ``training.checkpoint``), so no list of options is kept by hand.

An option renamed keeps its old spelling for a release (``renamed_from``): a hidden flag on the
command line and a key in files, each warning on stderr with the new name. The spellings are the
command lines' vocabulary, shared with ``mec-embed`` and ``mec-hub`` (README, "Command-line vocabulary").

``--config FILE`` reads a YAML mapping of field names to values (the shipped recipes are in
``training/configs/``); options given on the command line override the file, and the file
overrides the defaults. Paths in a file are taken relative to the current directory, as on the
command line (``~`` is expanded). A key that is no field, or a value of the wrong type, is an
error naming the key. A run writes its resolved options to ``OUT/config.yaml``, which
``--config`` reads back.

Why hand-written and not jsonargparse (or tyro, simple-parsing): considered in issue 19; it would delete the
generic plumbing (``build_parser``, ``_converter``, ``_check_value``, ``read_yaml``: about 150 of 600 lines),
not halve the module: the fields with their help text and ``check()`` stay. And it would not give what the
tests pin: one-line errors naming the file and key (with "did you mean"), YAML 1.1's ``1e-5`` read as a
number, the paper's defaults shown in ``--help``, ``recipe`` metadata for the resume check, and no new dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mec_hub.errors import MalformedFileError
from mec_hub.fileio import atomic_write_text, json_plain, parse_json, read_bounded
from mec_hub.models.encoder import STEMS
from mec_hub.models.losses import PAPER_EPS2
from mec_hub.runtime.devices import PRECISIONS
from training.data import AUGMENTATIONS
from training.optim import OPTIMIZERS

PROG = "training/pretrain.py"
# The paper's global batch: ``--eps2 scaled`` keeps lamda at its value there.
PAPER_BATCH = 1024
# Without an explicit --eps2, a run whose lamda = d / (m * 64) reaches this stops before training:
# ||C|| >= lamda once the two views agree, and at ||C|| = 1/2 the order-4 series of log(1 + x) is
# already 1.5% off on that direction (x^5 / 5 against log 1.5), at 1 it diverges.
MAX_DEFAULT_LAMDA = 0.5
CONFIG_FILE = "config.yaml"
YAML_ADVICE = "pip install 'mec-hub[train]' (or: pip install pyyaml)"


class ConfigError(ValueError):
    """An option or a config file's key that cannot make a run; the message names it, on one line."""


def scaled_eps2(batch_size: int) -> float:
    """``--eps2 scaled``: ``64 * 1024 / m``, which keeps ``lamda = d / (m * eps^2)`` at its value at the paper's batch.

    Not the paper's objective: the authors' code keeps eps^2 = 64 at every batch size, and a
    different eps^2 changes the loss's gradient direction, not only its scale. It is the choice
    for small batches, where 64 puts lamda so high that the order-4 series stops standing for the
    log-determinant: ``||C|| >= lamda`` once the two views agree, ``C = lamda * z1 z2^T``, and at
    eps^2 64 and d 2048 lamda is 1/32 at m = 1024 but 1/2 at m = 64 and 1 at m = 32.
    """
    return PAPER_EPS2 * PAPER_BATCH / batch_size


def eps2_rule(eps2: float, batch_size: int) -> str | None:
    """Where a non-paper ``eps2`` comes from (``--eps2 scaled: ...`` or ``set by --eps2``); ``None`` for 64."""
    if eps2 == PAPER_EPS2:
        return None
    if math.isclose(eps2, scaled_eps2(batch_size), rel_tol=1e-12):
        return f"--eps2 scaled: 64 x {PAPER_BATCH} / {batch_size}, lamda as at the paper's batch of {PAPER_BATCH}"
    return "set by --eps2"


def eps2_note(eps2: float, batch_size: int) -> str | None:
    """One line saying that ``eps2`` is not the paper's (and what it is), or ``None`` for the paper's 64."""
    rule = eps2_rule(eps2, batch_size)
    if rule is None:
        return None
    return f"eps^2 is {eps2:g}, not the paper's {PAPER_EPS2:g} ({rule}): a different objective from the authors' code"


# --------------------------------------------------------------------------------------------
# values that are not plain numbers or strings (each parses the command line's text and a file's string)


def parse_order(value: str) -> int | None:
    if value.lower() in ("exact", "none", "logdet"):
        return None
    try:
        order = int(value)
    except ValueError:
        raise ValueError(f"expected an integer >= 1 or 'exact', got {value!r}") from None
    if order < 1:
        raise ValueError("must be >= 1, or 'exact'")
    return order


def dump_order(value: int | None) -> int | str:
    return "exact" if value is None else value


def parse_eps2(value: str) -> float | str:
    if value.lower() == "scaled":
        return "scaled"
    if value.lower() == "auto":  # the default of earlier versions, which is no longer the default
        raise ValueError(
            "'auto' is no more: it meant 64 x 1024 / batch below a batch of 1024; write 'scaled' for that rule, "
            "or a number (the paper's 64 is the default)"
        )
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number or 'scaled', got {value!r}") from None


def parse_model_args(value: str) -> dict[str, Any]:
    try:
        parsed = parse_json(value, "--model-args")
    except MalformedFileError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
    return parsed


def option(
    default: Any,
    help: str,
    *,
    group: str | None = None,
    flags: Sequence[str] = (),
    renamed_from: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    dump: Callable[[Any], Any] | None = None,
    metavar: str | None = None,
    expected: str | None = None,
    recipe: bool = False,
    shown: str | None = None,
) -> Any:
    """A :class:`TrainConfig` field: its default, help text and command-line spelling.

    ``flags``: the option names (default ``--field-name``); ``renamed_from``: the field's old names,
    still read for a release as a hidden flag (``--old-name``) and a file's key, with a warning;
    ``parse``: text (command line, or a string in a file) to value; ``dump``: value to what
    ``config.yaml`` writes; ``expected``: what a wrong value's error says the field takes (default:
    from its type); ``recipe``: a
    resumed run must have the same value (see ``training.checkpoint.check_resumable``); ``shown``:
    the default as ``--help`` prints it (default: the value).
    """
    metadata = {
        "help": help,
        "group": group,
        "flags": tuple(flags),
        "renamed_from": tuple(renamed_from),
        "choices": tuple(choices) if choices is not None else None,
        "parse": parse,
        "dump": dump,
        "metavar": metavar,
        "expected": expected,
        "recipe": recipe,
        "shown": shown,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """The options of ``training/pretrain.py``, defaults the paper's recipe (Liu et al., NeurIPS 2022)."""

    # option() returns a dataclasses.field (RUF009 only sees a call in a default).

    data: Path | None = option(None, "folder of training images (recursive; labels ignored)")  # noqa: RUF009
    output_dir: Path | None = option(  # noqa: RUF009
        None, "where the run writes checkpoints, metrics.jsonl, config.yaml, export/; required"
    )
    init_from: str | None = option(
        None,
        "start the student's backbone (and projector, when the weights have one) from these weights, the "
        "teacher as a copy: anything mec_hub.load accepts (a registry name, an exported folder, a .safetensors "
        "file, hf-hub:org/name) or a checkpoint (a training/pretrain.py checkpoint_*.pt, the authors' "
        "checkpoint). Read at the start of a run only; a resumed run continues from its own checkpoint",
        metavar="WEIGHTS",
    )
    extend_epochs: int | None = option(
        None,
        "continue the run in --output-dir (finished or not) to N epochs in all, N > --epochs: from the "
        "checkpoint's step on, lr and teacher momentum follow the schedules of an N-epoch run (the "
        "cosines recomputed for the new length, as if --epochs had been N from the start; 1/lamda's warm-up "
        "does not depend on the length and is unchanged). Keep passing it to resume the extended run",
        metavar="N",
    )

    # ---- model
    arch: str = option("resnet50", "any timm architecture name", group="model", recipe=True)
    model_args: dict[str, Any] = option(  # noqa: RUF009
        {},
        "JSON keyword arguments for timm.create_model (a mapping in a config file)",
        group="model",
        parse=parse_model_args,
        metavar="JSON",
        expected="a mapping",
        recipe=True,
    )
    stem: str = option(
        "default", "'small': 3x3/1 ResNet stem for 32-64 px images", group="model", choices=STEMS, recipe=True
    )
    image_size: int = option(224, "training crop size", group="model", recipe=True)
    augmentation: str = option(
        "mocov3",
        "view augmentations; 'mocov3-noblur' drops the Gaussian blur, for 32-64 px images",
        group="model",
        choices=AUGMENTATIONS,
        recipe=True,
    )
    dim: int = option(2048, "projector output size d", group="model", recipe=True)
    hidden_dim: int | None = option(
        None, "projector hidden size (default: the backbone's features)", group="model", recipe=True
    )
    pred_dim: int = option(512, "predictor hidden size", group="model", recipe=True)

    # ---- recipe
    epochs: int = option(100, "epochs of the schedule", group="recipe", recipe=True)
    batch_size: int = option(
        1024, "global batch m, over all processes", group="recipe", flags=("-b", "--batch-size"), recipe=True
    )
    lr: float = option(0.5, "base lr; the peak lr is lr * batch_size / 256", group="recipe", recipe=True)
    # --wd (the authors' spelling) is a hidden alias: mec-hub eval linear spells the concept --weight-decay.
    weight_decay: float = option(
        1e-5, "weight decay", group="recipe", flags=("--weight-decay",), renamed_from=("wd",), recipe=True
    )
    momentum: float = option(0.9, "optimizer momentum", group="recipe", recipe=True)
    optimizer: str = option("sgd", "optimizer", group="recipe", choices=OPTIMIZERS, recipe=True)
    eps2: float | str | None = option(
        None,
        "squared distortion eps^2; lamda = d / (m * eps2), m the global batch. Default: the paper's 64 at every "
        "batch, as in the authors' code; a run whose lamda = d / (64 m) would be >= 0.5 (m <= d / 32: the order-4 "
        "series' region ends at ||C|| = 1, and ||C|| >= lamda once the two views agree) stops before training "
        "unless eps2 is given. 'scaled': 64 * 1024 / m, which keeps lamda at its batch-1024 value (the series "
        "converges at small batches, but the objective differs from the paper's); or any number",
        group="recipe",
        parse=parse_eps2,
        metavar="EPS2|scaled",
        expected="a number or 'scaled'",
        recipe=True,
        shown="64, the paper's",
    )
    order: int | None = option(
        4,
        "Taylor order, or 'exact' for the log-determinant",
        group="recipe",
        parse=parse_order,
        dump=dump_order,
        metavar="N|exact",
        expected="an integer >= 1 or 'exact'",
        recipe=True,
    )
    teacher_momentum: float = option(0.996, "EMA momentum at step 0 (cosine to 1)", group="recipe", recipe=True)
    warmup_epochs: int = option(10, "linear lr warm-up", group="recipe", recipe=True)
    lamda_warmup_epochs: int = option(10, "1/lamda goes from factor/lamda to 1/lamda", group="recipe", recipe=True)
    lamda_warmup_factor: float = option(8.0, "1/lamda at step 0, in units of 1/lamda", group="recipe", recipe=True)
    seed: int = option(0, "seed of the data order, augmentations and initial weights", group="recipe", recipe=True)

    # ---- run
    # --num-workers/-j as mec-embed and mec-hub eval spell it (mec_hub.cli.common.SPELLINGS says why).
    num_workers: int = option(
        8,
        "data-loading processes per training process",
        group="run",
        flags=("-j", "--num-workers"),
        renamed_from=("workers",),
        metavar="N",
    )
    # Checked by mec_hub.runtime.devices.resolve_device, the grammar of every command line (training.distributed).
    device: str = option(
        "auto",
        "where to train: auto (this process's GPU if CUDA works, else the CPU), cpu, cuda, cuda:N or mps",
        group="run",
        metavar="auto|cpu|cuda[:N]|mps",
    )
    precision: str = option("fp32", "autocast dtype (fp16: scaled)", group="run", choices=tuple(PRECISIONS))
    channels_last: bool = option(False, "NHWC memory format (faster convolutions on GPUs)", group="run")
    compile: bool = option(False, "torch.compile the model", group="run")
    max_steps: int | None = option(None, "stop after this many steps in total (smoke runs)", group="run")
    log_every: int = option(50, "steps between log lines", group="run")
    save_every_steps: int = option(0, "also checkpoint every N steps (0: epoch ends only)", group="run")
    snapshot_every: int = option(10, "keep checkpoint_epochNNNN.pt every N epochs (0: no)", group="run")
    keep_snapshots: int = option(0, "keep only the newest N snapshots (0: all)", group="run")
    tensorboard: bool = option(True, "write TensorBoard logs when tensorboard is installed", group="run")
    wandb: str | None = option(
        None,
        "also log the scalars to this Weights & Biases project (needs: pip install wandb)",
        group="run",
        metavar="PROJECT",
    )
    fidelity_every: int | None = option(
        None,
        "every N steps, measure the order-k series against the exact float64 log-determinant of the step's "
        "matrices: the relative error of its value (taylor_rel_error) and of its gradient w.r.t. the predictions "
        "(taylor_grad_rel_error), spectral_norm_exact, and taylor_measured_steps / taylor_undefined_steps (steps "
        "where det(I + C) <= 0) in metrics.jsonl; default: on the logged steps; 0: never",
        group="run",
        metavar="N",
    )
    dist_timeout_minutes: float = option(30.0, "collective timeout (kNN runs on rank 0)", group="run")

    # ---- export
    export_from: str = option("student", "which encoder to export", group="export", choices=("student", "teacher"))
    export_name: str | None = option(None, "model name in the exported config (default: mec_ARCH_DATA)", group="export")
    export_only: bool = option(False, "export OUT/checkpoint_last.pt to OUT/export and exit", group="export")

    # ---- kNN monitor
    knn_train: Path | None = option(None, "labelled ImageFolder for the kNN bank", group="kNN monitor")  # noqa: RUF009
    knn_val: Path | None = option(None, "labelled ImageFolder to classify", group="kNN monitor")  # noqa: RUF009
    knn_every: int = option(1, "epochs between kNN measurements (and at the end)", group="kNN monitor")
    knn_k: int = option(20, "neighbours", group="kNN monitor")
    knn_temperature: float = option(0.07, "temperature of the neighbours' weights", group="kNN monitor")

    @property
    def no_tensorboard(self) -> bool:
        return not self.tensorboard

    @property
    def total_epochs(self) -> int:
        """The schedule's length: ``--extend-epochs`` when given, else ``--epochs``."""
        return self.extend_epochs if self.extend_epochs is not None else self.epochs

    # ---- checks

    def check(self, world_size: int = 1) -> TrainConfig:
        """The config with ``eps2`` resolved to a number, or :class:`ConfigError` naming the first bad option."""
        if not self.export_only and self.data is None:
            raise ConfigError("--data is required (unless --export-only)")
        if self.output_dir is None:
            raise ConfigError("--output-dir is required (on the command line or as output_dir in the config file)")
        for name in ("epochs", "batch_size", "image_size", "dim", "pred_dim", "log_every", "knn_every", "knn_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1")
        non_negative = ("warmup_epochs", "lamda_warmup_epochs", "num_workers", "save_every_steps", "snapshot_every")
        for name in (*non_negative, "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0")
        for name in ("hidden_dim", "max_steps", "extend_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1")
        if self.fidelity_every is not None and self.fidelity_every < 0:
            raise ConfigError(f"{flag('fidelity_every')} must be >= 0 (0: never)")
        if self.order is not None and self.order < 1:
            raise ConfigError("--order must be >= 1, or 'exact'")
        if self.extend_epochs is not None and self.extend_epochs <= self.epochs:
            raise ConfigError(
                f"--extend-epochs {self.extend_epochs} must be more than --epochs {self.epochs}: it is the new "
                "length of the run, in epochs"
            )
        eps2 = self._resolved_eps2()
        if not (self.lr > 0 and eps2 > 0 and self.lamda_warmup_factor > 0 and self.weight_decay >= 0):
            raise ConfigError("--lr, --eps2 and --lamda-warmup-factor must be > 0, --weight-decay >= 0")
        if not 0 <= self.teacher_momentum <= 1:
            raise ConfigError("--teacher-momentum must be in [0, 1]")
        if self.batch_size % world_size:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by the {world_size} processes")
        if (self.knn_train is None) != (self.knn_val is None):
            raise ConfigError("--knn-train and --knn-val go together")
        return dataclasses.replace(self, eps2=float(eps2))

    def _resolved_eps2(self) -> float:
        """``--eps2`` as a number: the paper's 64 when not given (refused where it leaves the series' region)."""
        if self.eps2 == "scaled":
            return scaled_eps2(self.batch_size)
        if self.eps2 is not None:
            return float(self.eps2)
        lamda = self.dim / (self.batch_size * PAPER_EPS2)
        if lamda >= MAX_DEFAULT_LAMDA:
            smallest = math.floor(self.dim / (PAPER_EPS2 * MAX_DEFAULT_LAMDA)) + 1
            raise ConfigError(
                f"--batch-size {self.batch_size} with the paper's eps^2 of {PAPER_EPS2:g} puts lamda = d / (m eps^2) "
                f"= {self.dim} / ({self.batch_size} x {PAPER_EPS2:g}) = {lamda:.3g} at or above {MAX_DEFAULT_LAMDA}, "
                f"where the order-4 series no longer stands for the log-determinant: use a global batch of at least "
                f"{smallest}, or --eps2 scaled (= {scaled_eps2(self.batch_size):g} here: lamda as at the paper's "
                f"batch of {PAPER_BATCH}, a different objective from the paper's), or give --eps2 explicitly"
            )
        return PAPER_EPS2

    # ---- files

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from a file's mapping; unknown keys and mistyped values are :class:`ConfigError`."""
        return cls(**checked_values(mapping, source=source))

    def to_mapping(self) -> dict[str, Any]:
        """Field name -> plain value (str, int, float, bool, None, dict): what ``config.yaml`` holds."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["dump"] is not None:
                value = f.metadata["dump"](value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, dict):
                value = json_plain(value)  # a plain copy
            out[f.name] = value
        return out

    def to_yaml(self, header: str = "") -> str:
        yaml = import_yaml("writing config.yaml")
        comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        return comments + yaml.safe_dump(self.to_mapping(), sort_keys=False, default_flow_style=False)


def flag(name: str) -> str:
    """The option of field ``name`` as messages write it (its long flag: ``--batch-size``, not ``-b``)."""
    for f in fields(TrainConfig):
        if f.name == name:
            return next(o for o in _flags(f) if o.startswith("--"))
    raise KeyError(name)


def recipe_keys() -> tuple[str, ...]:
    """The fields a resumed run must share with its checkpoint, in declaration order."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["recipe"])


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def _old_flags(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple("--" + old.replace("_", "-") for old in f.metadata["renamed_from"])


def _renamed(old: str, new: str) -> None:
    """The one warning an old spelling gets, as a line on stderr."""
    print(f"{PROG}: warning: {old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr)


class _RenamedFlag(argparse.Action):
    """A hidden old flag: stores into the field, with a warning naming the new flag."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        _renamed(option_string or "/".join(self.option_strings), self.new)
        setattr(namespace, self.dest, values)


# --------------------------------------------------------------------------------------------
# types: one check for values from a file, argparse converters for the command line

_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def _members(hint: Any) -> tuple[Any, ...]:
    """``int | None`` -> ``(int, NoneType)``; ``dict[str, Any]`` -> ``(dict,)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(m) or m for m in typing.get_args(hint))
    return (typing.get_origin(hint) or hint,)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def _expected(f: dataclasses.Field) -> str:
    members = _members(_hints()[f.name])
    if f.metadata["choices"] is not None:
        return "one of " + ", ".join(map(str, f.metadata["choices"]))
    if f.metadata["expected"] is not None:
        return f.metadata["expected"]
    names = [_TYPE_NAMES.get(m, "a mapping" if m is dict else "null") for m in members if m is not type(None)]
    return " or ".join(names) + (" or null" if type(None) in members else "")


def _check_value(f: dataclasses.Field, value: Any, source: str) -> Any:
    members = _members(_hints()[f.name])
    where = f"{source}: {f.name}"

    def wrong() -> ConfigError:
        return ConfigError(f"{where}: expected {_expected(f)}, got {value!r}")

    if value is None:
        if type(None) in members:
            return None
        raise wrong()
    if isinstance(value, str) and f.metadata["parse"] is not None:
        try:
            value = f.metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif isinstance(value, bool):
        if bool not in members:
            raise wrong()
    elif isinstance(value, int) and int in members:
        pass
    elif isinstance(value, int | float) and float in members:
        value = float(value)
    elif isinstance(value, str) and float in members and str not in members:
        try:  # YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            raise wrong() from None
        if not math.isfinite(value):
            raise wrong()
    elif isinstance(value, str) and Path in members:
        value = Path(value).expanduser()  # a shell expands ~ on the command line; do it for files too
    elif isinstance(value, Mapping) and dict in members:
        value = dict(value)
    elif not (isinstance(value, str) and str in members):
        raise wrong()
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise wrong()
    return value


def checked_values(mapping: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Field name -> typed value, for a mapping read from ``source`` (a file name, for messages)."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(mapping).__name__}")
    by_name = {f.name: f for f in fields(TrainConfig)}
    renamed = {old: f.name for f in fields(TrainConfig) for old in f.metadata["renamed_from"]}
    out = {}
    for key, value in mapping.items():
        if key in renamed:
            if renamed[key] in mapping:
                raise ConfigError(f"{source}: {key!r} is the old name of {renamed[key]!r}: give one of them")
            _renamed(f"{source}: key {key!r}", repr(renamed[key]))
            key = renamed[key]
        if key not in by_name:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; the keys are the options' names, e.g. batch_size")
        out[key] = _check_value(by_name[key], value, source)
    return out


#: A --config file larger than this is refused before it is read (the recipe's own files are ~1 KB).
MAX_CONFIG_BYTES = 1024 * 1024


def import_yaml(purpose: str) -> types.ModuleType:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{purpose} needs PyYAML, which is not installed: {YAML_ADVICE}") from None
    return yaml


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The options in a YAML file, checked (:class:`ConfigError` names the file and the key)."""
    yaml = import_yaml(f"--config {path}")
    try:
        # A regular file of bounded size: a FIFO or a device as --config is refused, not waited on.
        text = read_bounded(path, MAX_CONFIG_BYTES, what="config file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except MalformedFileError as exc:  # names the file and why (a FIFO, too large, unreadable)
        raise ConfigError(f"--config {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    return checked_values(mapping if mapping is not None else {}, source=str(path))


def _converter(f: dataclasses.Field) -> Callable[[str], Any] | None:
    parse = f.metadata["parse"]
    if parse is not None:

        def convert(text: str) -> Any:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return convert
    for kind in (int, float, Path):
        if kind in _members(_hints()[f.name]):
            return kind
    return None


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if f.metadata["dump"] is not None:
        default = f.metadata["dump"](default)
    if isinstance(default, dict):
        return json.dumps(default)
    if isinstance(default, bool):
        return "yes" if default else "no"
    return "none" if default is None else str(default)


def build_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``training/pretrain.py``: ``--config FILE`` and one option per field.

    Options left out are absent from the namespace (``argparse.SUPPRESS``), so that
    :func:`parse_args` can tell them from a config file's values; ``--help`` shows each default.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=description, epilog=epilog)
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML file of options (keys: the option names with underscores, e.g. batch_size); options on the "
        "command line override it. Recipes: training/configs/",
    )
    groups: dict[str | None, Any] = {None: parser}
    for f in fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        help_text = f"{f.metadata['help']} (default: {_shown_default(f)})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if _members(_hints()[f.name]) == (bool,):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(f)
            if f.metadata["choices"] is not None:
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata["metavar"] is not None:
                kwargs["metavar"] = f.metadata["metavar"]
        groups[group].add_argument(*_flags(f), **kwargs)
        if _old_flags(f):
            hidden = {**kwargs, "help": argparse.SUPPRESS, "action": _RenamedFlag, "new": flag(f.name)}
            groups[group].add_argument(*_old_flags(f), **hidden)
    return parser


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Defaults, then ``--config FILE``, then the command line's options; exits 2 on a bad file (one line)."""
    parser = parser or build_parser()
    given = vars(parser.parse_args(list(argv)))
    path = given.pop("config", None)
    try:
        values = read_yaml(path) if path is not None else {}
    except ConfigError as exc:
        fail(parser, str(exc))
    return TrainConfig(**{**values, **given})


def fail(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    """Print ``PROG: error: message`` (one line, no usage or traceback) and exit 2, as argparse does."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def write_config(path: str | Path, config: TrainConfig, header: str = "") -> Path:
    """``config`` as YAML, written atomically (``--config path`` reads it back to the same config)."""
    return atomic_write_text(path, config.to_yaml(header))
