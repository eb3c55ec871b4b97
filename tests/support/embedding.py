"""Helpers shared by the tests of ``mec-embed`` / ``Embedder`` (tests/embedding/, tests/cli/test_embed.py, ...)."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.support.paths import REPO_ROOT

DRIVER = Path(__file__).with_name("embed_driver.py")


def make_images(folder: Path, count: int, *, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``count`` small random PNG/JPEG images of assorted sizes and modes in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        if i % 5 == 1:
            image = image.convert("L")
        suffix = ".jpg" if i % 4 == 3 else ".png"
        path = folder / f"{prefix}{i:04d}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


def reference_features(weights_dir: Path, paths: Sequence[Path]) -> np.ndarray:
    """``model(transform(image))``, one image at a time, NCHW, the plainest way to write it."""
    import torch
    from PIL import Image, ImageOps

    import mec_hub

    model = mec_hub.load(weights=weights_dir)
    transform = mec_hub.get_transform(model)
    rows = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB")
            rows.append(model(transform(rgb).unsqueeze(0))[0].numpy())
    return np.stack(rows)


def read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "MANIFEST.tsv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def cli_command(*args: object, **faults: object) -> list[str]:
    """``mec-embed ARGS`` as a command line; with ``faults`` (see tests/support/embed_driver.py, e.g.
    ``kill_after_batches=3``), run through the driver that injects them."""
    if not faults:
        return [sys.executable, "-m", "mec_hub.cli.embed", *(str(a) for a in args)]
    options = [f"--{name.replace('_', '-')}={value}" for name, value in faults.items()]
    return [sys.executable, str(DRIVER), *options, "--", *(str(a) for a in args)]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_in_own_group(
    command: list[str], *, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a new process group and kill what is left of the group when it ends.

    A process that dies by SIGKILL leaves its DataLoader workers behind for a few seconds; they
    would hold the output pipes open (and linger) if they were not ended with it.
    """
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_cli_subprocess(
    *args: object, timeout: float = 180, faults: dict[str, object] | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    return run_in_own_group(cli_command(*args, **(faults or {})), timeout=timeout, env=subprocess_env(**extra_env))


def meta_without_times(meta: dict) -> dict:
    """What two runs of the same inputs and options must agree on: all but the times and the run's id."""
    return {k: v for k, v in meta.items() if k not in ("started_at", "finished_at", "run_id")}
