"""Progress bars: the one rule for when mec_hub shows one, and the bar it shows.

A bar goes to standard error, and only when standard error is a terminal (a log file, a pipe, a
notebook or a test runner gets none), unless the caller says ``progress=True`` or ``False``.
Every long step follows this rule: feature extraction and ``mec-embed``, the linear probe's fits,
and downloads (huggingface_hub's bars and the bar of a plain URL's download).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(progress: bool | None = None) -> bool:
    """``progress`` when given; otherwise whether standard error is a terminal."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress_bar(*, total: int | None, desc: str, unit: str, progress: bool | None = None, **options: Any) -> Any:
    """A tqdm bar on standard error (with tqdm's own rate and ETA), disabled unless ``progress_enabled(progress)``."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(progress),
        file=sys.stderr,
        dynamic_ncols=True,
        **options,
    )
