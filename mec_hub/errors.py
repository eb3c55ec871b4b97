"""Errors a user can act on.

Every failure that bad input or a bad environment can cause is one of these, with a message that
names the file, model or argument (as Python spells it: ``weights=``) and says what to do. The CLI
prints the message alone (no traceback), each argument it names spelled as the flag that sets it
(``--weights``), and exits with status 1.
"""

from __future__ import annotations

from collections.abc import Iterable


class MecHubError(Exception):
    """Base class of all errors raised on purpose by mec_hub.

    A message names the arguments it speaks of as Python spells them: ``weights=`` (the argument),
    ``overwrite=True``, ``weights='DIR'`` or ``weights=DIR`` (one with a value). ``arguments`` lists
    those names (``("weights",)``), so that the command line can say the same with its flags
    (``--weights``, ``--overwrite``, ``--weights DIR``; ``mec_hub.cli.common.cli_message``).
    """

    arguments: tuple[str, ...] = ()

    def __init__(self, *args: object, arguments: Iterable[str] = ()) -> None:
        super().__init__(*args)
        self.arguments = tuple(arguments)


class InvalidArgumentError(MecHubError, ValueError):
    """Arguments that contradict each other or take a value that does not exist."""


class UnknownModelError(MecHubError, ValueError):
    """A model name that is not in the registry."""


class WeightsNotFoundError(MecHubError, FileNotFoundError):
    """Weights that cannot be found: a missing path, a missing file in a repo, nothing cached offline."""


class ChecksumMismatchError(MecHubError):
    """A weights file whose SHA-256 is not the published one (corrupted, truncated or replaced)."""

    def __init__(self, path: str, expected: str, actual: str, removed: bool = False) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        note = " The file was removed from the cache; run the command again to download it anew." if removed else ""
        super().__init__(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. "
            f"The file is corrupted, truncated or not the published one.{note}"
        )


class IncompatibleWeightsError(MecHubError):
    """Weights that do not fit the architecture: missing, unexpected or mis-shaped keys."""


class CheckpointReadError(MecHubError):
    """A checkpoint file that cannot be read or whose layout is not recognised."""


class MalformedFileError(MecHubError):
    """A file that cannot be read as its format: truncated, corrupt, too large or deliberately hostile."""
