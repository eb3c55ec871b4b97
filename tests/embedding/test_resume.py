"""Kill a run at a bad moment, resume it, and get the files of an uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main
from mec_hub.embedding.npy_writer import HEADER_SIZE
from tests.support.embedding import cli_command, make_images, meta_without_times, run_cli_subprocess, subprocess_env

BATCH = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "imgs"
    make_images(folder, 22)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # failures must survive resumes too
    (folder / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(images: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "f.npy"
    result = CliRunner().invoke(
        main,
        [
            str(images),
            "--out",
            str(out),
            "--weights",
            str(tiny_weights_dir),
            "--device",
            "cpu",
            "-b",
            str(BATCH),
            "-j",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def args(images: Path, out: Path, weights: Path, *extra: object) -> list[object]:
    return [images, "--out", out, "--weights", weights, "--device", "cpu", "-b", BATCH, "-j", 1, "-q", *extra]


def assert_same_outputs(out: Path, reference: Path) -> None:
    assert out.read_bytes() == reference.read_bytes()
    paths = out.with_name(out.stem + ".paths.txt")
    assert paths.read_text() == reference.with_name(reference.stem + ".paths.txt").read_text()
    meta = json.loads(out.with_name(out.stem + ".meta.json").read_text())
    reference_meta = json.loads(reference.with_name(reference.stem + ".meta.json").read_text())
    for m in (meta, reference_meta):
        m.pop("features"), m.pop("paths")
    assert meta_without_times(meta) == meta_without_times(reference_meta)
    assert meta["num_failed"] == 2


@pytest.mark.slow
def test_sigkill_between_writing_rows_and_checkpointing(
    images: Path, tiny_weights_dir: Path, uninterrupted: Path, tmp_path: Path
):
    out = tmp_path / "f.npy"
    # SIGKILL itself after writing the rows of its 3rd batch, before recording them as done.
    killed = run_cli_subprocess(*args(images, out, tiny_weights_dir), faults={"kill_after_batches": 3})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # Nothing final-looking exists; the partial rows run past the checkpoint.
    assert not out.exists() and not out.with_name("f.paths.txt").exists()
    assert not out.with_name("f.meta.json").exists()
    part = tmp_path / ".f.npy.part-0-of-1"
    state = json.loads(part.with_name(part.name + ".state.json").read_text())
    assert state["items_done"] == 2 * BATCH and state["rows_done"] <= 2 * BATCH
    assert part.stat().st_size > HEADER_SIZE + state["rows_done"] * 512 * 4

    refused = CliRunner().invoke(main, [str(a) for a in args(images, out, tiny_weights_dir)])
    assert refused.exit_code == 1 and "--resume" in refused.output

    changed = CliRunner().invoke(main, [str(a) for a in args(images, out, tiny_weights_dir, "--normalize", "--resume")])
    assert changed.exit_code == 1 and "--normalize was False, now True" in changed.output

    resumed = run_cli_subprocess(*args(images, out, tiny_weights_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(out, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.meta.json", "f.npy", "f.paths.txt"]


def sigint_as_in_a_terminal() -> None:
    """A job started in the background by a shell (as `.ci/run &` does) ignores SIGINT, and its
    children inherit that; a Ctrl-C from a terminal reaches a process whose SIGINT is the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_the_work_and_resume_finishes_it(
    images: Path, tiny_weights_dir: Path, uninterrupted: Path, tmp_path: Path
):
    out = tmp_path / "f.npy"
    state_file = tmp_path / ".f.npy.part-0-of-1.state.json"
    proc = subprocess.Popen(
        cli_command(*args(images, out, tiny_weights_dir), batch_delay=0.5),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if state_file.exists() and json.loads(state_file.read_text())["items_done"] >= BATCH:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run made no progress")
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()

    resumed = CliRunner().invoke(main, [str(a) for a in args(images, out, tiny_weights_dir, "--resume")])
    assert resumed.exit_code == 0, resumed.output
    assert_same_outputs(out, uninterrupted)


def test_resume_needs_the_same_number_of_processes(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.npy"
    # an unfinished two-process run left its progress files behind
    (tmp_path / ".f.npy.part-1-of-2.state.json").write_text("{}")
    result = CliRunner().invoke(main, [str(a) for a in args(images, out, tiny_weights_dir, "--resume")])
    assert result.exit_code == 1 and "used 2 process(es), this one 1" in result.output
    overwrite = CliRunner().invoke(main, [str(a) for a in args(images, out, tiny_weights_dir, "--overwrite")])
    assert overwrite.exit_code == 0, overwrite.output
    assert np.load(out).shape == (22, 512)
    assert not list(tmp_path.glob(".f.npy.part-*"))
