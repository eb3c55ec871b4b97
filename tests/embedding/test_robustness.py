"""A file that crashes or hangs the decoder costs that file, not the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main
from mec_hub.embedding.loader import DECODE_TIMEOUT_ENV
from tests.support.embedding import make_images, run_cli_subprocess


@pytest.mark.slow
def test_a_crashing_and_a_hanging_file_become_failures(tiny_weights_dir: Path, tmp_path: Path):
    images = tmp_path / "imgs"
    paths = make_images(images, 9)
    # Two valid images that tests/support/embed_driver.py makes the worker die on (SIGSEGV) or hang on.
    shutil.copy(paths[2], images / "img0002_crash.png")
    shutil.copy(paths[6], images / "img0006_hang.png")
    common = [images, "--weights", tiny_weights_dir, "--device", "cpu", "-b", 4, "-j", 1, "-q"]

    broken = run_cli_subprocess(
        *common,
        "--out",
        tmp_path / "b.npy",
        timeout=240,
        faults={"crash_on": "_crash.png", "hang_on": "_hang.png"},
        **{DECODE_TIMEOUT_ENV: "2"},
    )
    assert broken.returncode == 0, broken.stderr[-3000:]
    healthy = CliRunner().invoke(main, [str(a) for a in (*common, "--out", tmp_path / "h.npy")])
    assert healthy.exit_code == 0, healthy.output

    meta = json.loads((tmp_path / "b.meta.json").read_text())
    reasons = {entry["path"]: entry["reason"] for entry in meta["failed"]}
    assert set(reasons) == {"img0002_crash.png", "img0006_hang.png"}
    assert reasons["img0002_crash.png"].startswith("the decoder crashed on this file (its process died")
    assert reasons["img0006_hang.png"].startswith("decoding did not finish within 2 s")

    # Every other row is there, in order, with the numbers of a run that never saw trouble.
    names = (tmp_path / "b.paths.txt").read_text().splitlines()
    all_names = (tmp_path / "h.paths.txt").read_text().splitlines()
    assert names == [n for n in all_names if n not in reasons]
    keep = [all_names.index(n) for n in names]
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "h.npy")[keep], rtol=1e-5, atol=1e-5)
