"""What every command shares: turning expected errors into one clear line and an exit status."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mec_hub.errors import InvalidArgumentError, MecHubError, UnknownModelError

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """Printed as ``Error: message`` with exit status 1, no traceback."""

    exit_code = 1


class UsageLineError(UserError):
    """A usage error (options that contradict each other, a value that does not exist) as one line,
    exit status 2 as click's own usage errors, without click's usage banner."""

    exit_code = 2


# The Python argument behind each flag whose name is not the argument's (the rule for all others:
# ``num_workers`` is ``--num-workers``). The one table that turns a library message into the
# command line's words.
FLAGS = {"name": "--model", "source": "--from", "framework": "--to", "rows": "--row"}


def flag_of(argument: str) -> str:
    """The flag that sets Python argument ``argument`` (``"weights"`` -> ``"--weights"``)."""
    return FLAGS.get(argument) or "--" + argument.replace("_", "-")


def cli_message(exc: MecHubError) -> str:
    """``exc``'s message with each Python argument it names (``exc.arguments``) spelled as its flag:
    ``weights=`` -> ``--weights``, ``overwrite=True`` -> ``--overwrite``, ``weights='DIR'`` or
    ``weights=DIR`` -> ``--weights DIR``."""
    text = str(exc)
    for argument in exc.arguments:
        flag = flag_of(argument)

        def spell(match: re.Match[str], flag: str = flag) -> str:
            value = match.group(2) if match.group(2) is not None else match.group(3)
            return flag if value is None else f"{flag} {value}"

        text = re.sub(rf"(?<![\w.-]){re.escape(argument)}=(?:(True)\b|'([^']*)'|([^\s,;:()'\"]+))?", spell, text)
    return text


def friendly_errors(func: F) -> F:
    """Report mec_hub's errors (and unreadable files) as one line instead of a traceback, naming
    flags where the library's message names Python arguments (``cli_message``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (InvalidArgumentError, UnknownModelError) as exc:  # the command line asked for something impossible
            raise UsageLineError(cli_message(exc)) from None
        except MecHubError as exc:
            raise UserError(cli_message(exc)) from None
        except PermissionError as exc:
            raise UserError(f"permission denied: {exc.filename or exc}") from None

    return wrapper  # type: ignore[return-value]


def show_warnings_briefly() -> None:
    """Warnings (e.g. unverified weights) as ``Warning: ...`` lines on stderr, not source excerpts."""

    def _show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        click.secho(f"Warning: {message}", fg="yellow", err=True)

    warnings.showwarning = _show  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# The command lines' vocabulary: each concept has one spelling, in mec-embed, every mec-hub command
# and training/pretrain.py alike (README, "Command-line vocabulary"; tests/cli/test_vocabulary.py).
# An old spelling stays for one release as a hidden alias that warns (``RenamedOption``).
#
# --num-workers/-j: the Python API's ``num_workers=`` (and DataLoader's), so that ``flag_of`` maps the
# one to the other; -j as torchvision's and timm's reference scripts have it (their long form,
# --workers, was training's: now its hidden alias). --out names the one file (or, for convert --to
# folder, the one folder) a command writes; --output-dir the folder a run fills and resumes from.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "out": ("-o", "--out"),
    "output_dir": ("--output-dir",),
    "model": ("-m", "--model"),
    "batch_size": ("-b", "--batch-size"),
    "num_workers": ("-j", "--num-workers"),
    "top_k": ("-k", "--top-k"),
    "device": ("--device",),
}

#: What FEATURES (search, index, serve) may name, as the help texts say it.
FEATURE_SET = (
    "a feature set written by mec-embed: FEATS.npy (with FEATS.paths.txt and FEATS.meta.json), or FEATS.parquet "
    "(one file, or its shards FEATS-00000.parquet ... named by FEATS.parquet)"
)


class RenamedOption(click.Option):
    """An option that also answers to its old names (``old_names``) for a release: they are left out of
    ``--help``, and using one prints a ``Warning:`` line naming the new spelling."""

    def __init__(self, *args: Any, old_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if old_names and (self.is_flag or self.count):
            raise TypeError("RenamedOption takes old names for options with a value only")
        self.old_names = tuple(old_names)

    @property
    def _old_dest(self) -> str:
        return f"{self.name}:old"

    @property
    def spelling(self) -> str:
        """The long name, as messages write it."""
        return next((o for o in self.opts if o.startswith("--")), self.opts[0])

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        if self.old_names:
            action = "append" if self.multiple else "store"
            parser.add_option(obj=self, opts=self.old_names, dest=self._old_dest, action=action, nargs=self.nargs)

    def consume_value(self, ctx: click.Context, opts: Any) -> Any:
        if self.old_names and self._old_dest in opts:
            old = "/".join(self.old_names)
            click.secho(
                f"Warning: {old} is deprecated and will be removed in the next release; use {self.spelling}",
                fg="yellow",
                err=True,
            )
            if self.name not in opts:  # the new spelling wins when both are given
                opts = {**opts, self.name: opts[self._old_dest]}
        return super().consume_value(ctx, opts)


def option(concept: str, name: str | None = None, *, old_names: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``click.option`` spelled as ``SPELLINGS[concept]`` (the function's argument: ``name``, default
    ``concept``), also answering to ``old_names`` (hidden, with a deprecation warning)."""
    return click.option(*SPELLINGS[concept], name or concept, cls=RenamedOption, old_names=old_names, **kwargs)


def device_option(what: str) -> Any:
    """``--device``, the one grammar (``mec_hub.runtime.devices.resolve_device``), checked as it is
    parsed: a malformed device, or one this machine lacks, is a usage error (exit 2) naming it."""
    return option(
        "device",
        default="auto",
        show_default=True,
        metavar="auto|cpu|cuda[:N]|mps",
        callback=_checked_device,
        help=f"Where to {what}: auto (this process's GPU if CUDA works, else the CPU), cpu, cuda, cuda:N or mps.",
    )


def _checked_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "auto" or ctx.resilient_parsing:  # auto always resolves; torch not needed yet
        return value
    from mec_hub.runtime.devices import DeviceError, resolve_device  # torch: once a device is named

    try:
        resolve_device(value)
    except DeviceError as exc:
        raise click.BadParameter(f"{exc.device!r} {exc.reason}", ctx=ctx, param=param) from None
    return value
