"""What a hostile user tried (issue 10): files that block, kills at bad moments, two runs at once,
a full disk, damaged partial files, odd ``--out`` values and file names. Each run ends in seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from mec_hub.cli.embed import main
from mec_hub.data.featurefile import FeatureFile
from mec_hub.embedding.loader import DECODE_TIMEOUT_ENV
from mec_hub.embedding.outputs import OutputError, OutputFiles, RunLock
from mec_hub.errors import MecHubError
from tests.support.embedding import (
    cli_command,
    make_images,
    meta_without_times,
    reference_features,
    run_cli_subprocess,
    subprocess_env,
)

BATCH = 4
LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 files: broken.png (a failure, in the first batch) and img0000..img0009; batches of 4."""
    folder = tmp_path_factory.mktemp("reliability") / "imgs"
    make_images(folder, 10)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return folder


def cli_args(images: Path, out: Path, weights: Path, *extra: object) -> list[object]:
    return [images, "--out", out, "--weights", weights, "--device", "cpu", "-b", BATCH, "-j", 0, "-q", *extra]


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(images: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outputs of a run that nothing disturbed."""
    out = tmp_path_factory.mktemp("reference") / "f.npy"
    result = invoke(*cli_args(images, out, tiny_weights_dir))
    assert result.exit_code == 0, result.output
    return out


def side(out: Path, suffix: str) -> Path:
    return out.with_name(out.name[: -len(".npy")] + suffix)


def comparable_meta(out: Path) -> dict:
    meta = meta_without_times(json.loads(side(out, ".meta.json").read_text()))
    for key in ("features", "paths"):  # the file names
        meta.pop(key, None)
    return meta


def assert_same_outputs(out: Path, reference: Path) -> None:
    assert out.read_bytes() == reference.read_bytes()
    assert side(out, ".paths.txt").read_bytes() == side(reference, ".paths.txt").read_bytes()
    assert comparable_meta(out) == comparable_meta(reference)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(("f.", ".f."))) == [
        "f.meta.json",
        "f.npy",
        "f.paths.txt",
    ]


def one_error_line(output: str) -> str:
    """The single ``Error: ...`` line a failed command must print (and nothing like a traceback)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and len(lines) == 1, output
    return errors[0]


def assert_clean_failure(result: Result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit | None), result.output
    return one_error_line(result.output)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- files that block


def odd_folder(images: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """The images plus a FIFO, a symbolic link to a device and a UNIX socket, each with an image name."""
    folder = root / "odd"
    shutil.copytree(images, folder)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "device.png").symlink_to(os.devnull)
    expected = {"fifo.jpg": "a named pipe (FIFO)", "device.png": "a character device"}
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # a socket's path has to be short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(short / "s"))
    (folder / "socket.png").symlink_to(short / "s")
    expected["socket.png"] = "a socket"
    return folder, expected


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifos_devices_and_sockets_fail_without_being_read(
    images: Path, reference: Path, tiny_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Decoded by a worker process; without workers, see test_embed_refuses_a_fifo_at_once."""
    folder, expected = odd_folder(images, tmp_path)
    out = tmp_path / "f.npy"
    monkeypatch.setenv(DECODE_TIMEOUT_ENV, "5")  # a file that blocks is given up after 5 s, not 600
    started = time.monotonic()
    run = invoke(*cli_args(folder, out, tiny_weights_dir, "-j", 1))
    assert run.exit_code == 0, run.output
    took = time.monotonic() - started
    failed = {e["path"]: e["reason"] for e in json.loads(side(out, ".meta.json").read_text())["failed"]}
    assert set(failed) == {"broken.png", *expected}
    for name, kind in expected.items():
        assert failed[name] == f"not a regular file: {kind}", failed[name]
    # Every real image is there, with the numbers of the undisturbed run.
    assert side(out, ".paths.txt").read_text() == side(reference, ".paths.txt").read_text()
    np.testing.assert_allclose(np.load(out), np.load(reference), rtol=1e-5, atol=1e-5)
    assert took < 30, f"took {took:.0f} s"  # not two decode timeouts (of 5 s here) per odd file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_embed_refuses_a_fifo_at_once(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    from mec_hub.data.images import ImageDecodeError
    from mec_hub.embedding.engine import Embedder

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", batch_size=BATCH, num_workers=0)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            embedder.embed([images / "img0000.png", fifo])
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # opened for reading, the FIFO waits for a writer: be one, so the call returns
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(20)
        pytest.fail("embed() blocked on a FIFO")
    assert isinstance(outcome[0], ImageDecodeError), outcome
    assert str(outcome[0]) == f"{fifo}: not a regular file: a named pipe (FIFO)"


# --------------------------------------------------------------------------- kills


@pytest.mark.slow  # 4 s: a run killed mid-batch, its workers looked for in /proc
@pytest.mark.skipif(not LINUX, reason="reads /proc; the parent-death signal is Linux's")
def test_no_decoding_worker_outlives_a_killed_run(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    mark = tmp_path / "hung.pids"
    command = cli_command(*cli_args(images, tmp_path / "f.npy", tiny_weights_dir, "-j", 1), hang_on="img0001",
                          hang_mark=mark)  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe, that an orphan worker would keep open
        proc = subprocess.Popen(command, env=subprocess_env(), start_new_session=True, stderr=stderr)
    try:
        wait_for(lambda: (mark.exists() and mark.read_text().strip()) or proc.poll() is not None, 120, "the hang")
        assert proc.poll() is None, log.read_text()[-3000:]
        worker = int(mark.read_text().split()[0])
        assert alive(worker)
        os.kill(proc.pid, signal.SIGKILL)  # as `kill -9 PID` of the run does
        proc.wait(30)
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(worker), "a decoding worker outlived its killed run"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_resume_right_after_kill_9(images: Path, reference: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.npy"
    # Killed after its first batch while its decoding worker is busy on the second (stuck on img0005).
    command = cli_command(*cli_args(images, out, tiny_weights_dir, "-j", 1), kill_after_batches=1, hang_on="img0005")
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe, that an orphan worker would keep open
        killed = subprocess.Popen(command, env=subprocess_env(), start_new_session=True, stderr=stderr)
    try:
        killed.wait(timeout=120)
        assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        resumed = invoke(*cli_args(images, out, tiny_weights_dir, "--resume"))
        assert resumed.exit_code == 0, resumed.output
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
    assert_same_outputs(out, reference)


# --------------------------------------------------------------------------- the output lock

LOCK_AND_FORK = textwrap.dedent(
    """
    import os, signal, sys, time
    from mec_hub.embedding.outputs import OutputFiles, RunLock
    lock = RunLock(OutputFiles.for_out(sys.argv[1]))  # kept: it holds the lock
    lock.acquire()
    child = os.fork()
    if child == 0:  # a child that outlives the run, as a stuck decoding worker would
        for fd in (1, 2):  # not keeping the test's pipes open
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_dead_runs_lock_is_free_even_while_its_children_live(tmp_path: Path):
    out = tmp_path / "f.npy"
    proc = subprocess.run(
        [sys.executable, "-c", LOCK_AND_FORK, str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    try:
        assert alive(child) if LINUX else True
        lock = RunLock(OutputFiles.for_out(out))
        lock.acquire()  # the run that held it is dead; its child does not hold it
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


# Takes the lock the way the package does, but stops just before the locking call until told to go.
GATED_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    out, opened, go = sys.argv[1:4]
    first = [True]
    def gated(real):
        def call(*args, **kwargs):
            if first[0]:
                first[0] = False
                open(opened, "w").close()
                deadline = time.monotonic() + 60
                while not os.path.exists(go) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return real(*args, **kwargs)
        return call
    fcntl.flock, fcntl.lockf, fcntl.fcntl = gated(fcntl.flock), gated(fcntl.lockf), gated(fcntl.fcntl)
    from mec_hub.embedding.outputs import OutputError, OutputFiles, RunLock
    try:
        lock = RunLock(OutputFiles.for_out(out))
        lock.acquire()
        print("held", flush=True)
    except OutputError as exc:
        print("refused:", exc, flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_the_lock_has_no_window_between_release_and_acquire(tmp_path: Path):
    """B opens the lock file while A holds it; A finishes; C takes the lock; then B locks what it opened."""
    out = tmp_path / "f.npy"
    files = OutputFiles.for_out(out)
    opened, go = tmp_path / "opened", tmp_path / "go"
    a = RunLock(files)
    a.acquire()
    b = subprocess.Popen(
        [sys.executable, "-c", GATED_LOCK, str(out), str(opened), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    c = RunLock(files)
    try:
        wait_for(lambda: opened.exists() or b.poll() is not None, 60, "B to open the lock file")
        a.release()
        c.acquire()
        go.touch()
        stdout, stderr = b.communicate(timeout=60)
    finally:
        go.touch()
        c.release()
        if b.poll() is None:
            b.kill()
            b.wait()
    assert stdout.startswith("refused: another mec-embed run is writing f.npy"), stdout + stderr


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from mec_hub.embedding.outputs import OutputFiles, RunLock
    lock = RunLock(OutputFiles.for_out(sys.argv[1]))  # kept: it holds the lock
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
    """
)


def test_one_run_at_a_time_into_the_same_outputs(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.npy"
    holder = subprocess.Popen(  # another process that is writing f.npy, as far as the lock goes
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        refused = invoke(*cli_args(images, out, tiny_weights_dir, "--overwrite"))
        line = assert_clean_failure(refused)
        assert line.startswith("Error: another mec-embed run is writing f.npy"), line
        assert not out.exists()
    finally:
        holder.communicate(input="", timeout=60)
    assert invoke(*cli_args(images, out, tiny_weights_dir, "--overwrite")).exit_code == 0  # once it is done
    assert np.load(out).shape == (10, 512)

    # In one process, two runs into the same outputs exclude each other too.
    lock = RunLock(OutputFiles.for_out(tmp_path / "g.npy"))
    lock.acquire()
    with pytest.raises(OutputError, match=r"another mec-embed run is writing g\.npy"):
        RunLock(OutputFiles.for_out(tmp_path / "g.npy")).acquire()
    lock.release()


# --------------------------------------------------------------------------- --overwrite, then --resume


@pytest.mark.slow  # 4 s: a killed --overwrite resumed; test_resume_right_after_kill_9 stays in the default suite
def test_resume_of_an_interrupted_overwrite_continues_it(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    out = tmp_path / "f.npy"
    assert invoke(*cli_args(folder, out, tiny_weights_dir)).exit_code == 0
    # New content under the same names: one image in the first batch, one in the last.
    make_images(tmp_path / "new", 10, seed=7)
    for name in ("img0000.png", "img0009.png"):
        shutil.copy(tmp_path / "new" / name, folder / name)

    killed = run_cli_subprocess(
        *cli_args(folder, out, tiny_weights_dir, "--overwrite"), faults={"kill_after_batches": 2}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = invoke(*cli_args(folder, out, tiny_weights_dir, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "already complete" not in resumed.output

    names = side(out, ".paths.txt").read_text().splitlines()
    assert names == [f"img{i:04d}.png" if i % 4 != 3 else f"img{i:04d}.jpg" for i in range(10)]
    expected = reference_features(tiny_weights_dir, [folder / n for n in names])  # the new images' features
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- publishing the three files


# [2] (slow) checks the same guarantee one rename later
@pytest.mark.parametrize("renames_done", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_kill_while_publishing_never_shows_a_mix(
    images: Path, tiny_weights_dir: Path, tmp_path: Path, renames_done: int
):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    out = tmp_path / "f.npy"
    assert invoke(*cli_args(folder, out, tiny_weights_dir)).exit_code == 0
    old = FeatureFile.open(out)
    old_rows, old_paths = np.array(old.matrix), old.paths
    # The new run sees other images under the same number of names.
    (folder / "img0004.png").unlink()
    make_images(folder, 1, seed=3, prefix="zz")

    killed = run_cli_subprocess(
        *cli_args(folder, out, tiny_weights_dir, "--overwrite"), faults={"kill_at_publish": renames_done}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # What a reader finds now is the old set whole, or a refusal that says why; never a mix.
    try:
        seen = FeatureFile.open(out)
    except MecHubError as exc:
        assert "do not belong together" in str(exc) and "resume=True" in str(exc), str(exc)
    else:
        assert seen.paths == old_paths and np.array_equal(seen.matrix, old_rows)

    resumed = invoke(*cli_args(folder, out, tiny_weights_dir, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    new = FeatureFile.open(out)
    assert "zz0000.png" in new.paths and "img0004.png" not in new.paths
    images_now = [folder / n for n in new.paths]
    np.testing.assert_allclose(new.matrix, reference_features(tiny_weights_dir, images_now), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("where", ["mid-run", "publish-first", "publish-last"])
def test_a_full_disk_is_one_line_and_resume_finishes(
    images: Path, reference: Path, tiny_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
):
    from tests.support.embed_driver import disk_full_after_batches, fail_publish

    if where == "mid-run":
        disk_full_after_batches(2, setattr=monkeypatch.setattr)  # the rows of the 2nd batch
    else:  # the rename of the first or the last of the three final files
        fail_publish(1 if where == "publish-first" else 3, kill=False, setattr=monkeypatch.setattr)
    out = tmp_path / "f.npy"
    full = invoke(*cli_args(images, out, tiny_weights_dir))
    monkeypatch.undo()
    line = assert_clean_failure(full)
    assert "No space left on device" in line and "--resume" in line, line
    resumed = invoke(*cli_args(images, out, tiny_weights_dir, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert_same_outputs(out, reference)


# --------------------------------------------------------------------------- damaged partial files


def _stop_after_two_batches(progress) -> None:  # type: ignore[no-untyped-def]
    if progress.done >= 2 * BATCH:
        raise KeyboardInterrupt


def _damage(tmp_path: Path, what: str) -> None:
    part = tmp_path / ".f.npy.part-0-of-1"
    if what == "truncated data file":
        with open(part, "r+b") as fh:
            fh.truncate(300)
    elif what == "garbage failure log":
        log = part.with_name(part.name + ".failed.jsonl")
        log.write_bytes(b"\xff\xfe{not json at all\n" * 8)
    elif what == "clobbered header":
        with open(part, "r+b") as fh:
            fh.write(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'shape': (((")
    elif what == "clobbered state":
        state = part.with_name(part.name + ".state.json")
        data = json.loads(state.read_text())
        state.write_text(json.dumps({**data, "items_done": "eight", "rows_done": None}))


@pytest.mark.parametrize("what", ["truncated data file", "garbage failure log", "clobbered header", "clobbered state"])
def test_damaged_partial_files_are_one_line(images: Path, tiny_weights_dir: Path, tmp_path: Path, what: str):
    from mec_hub.embedding.engine import Embedder
    from mec_hub.embedding.job import EmbeddingInterrupted

    out = tmp_path / "f.npy"
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", batch_size=BATCH, num_workers=0)
    with pytest.raises(EmbeddingInterrupted):
        embedder.embed_folder(images, out, progress=False, on_commit=_stop_after_two_batches)
    _damage(tmp_path, what)
    line = assert_clean_failure(invoke(*cli_args(images, out, tiny_weights_dir, "--resume")))
    assert ".f.npy.part-0-of-1" in line and "--overwrite" in line, line
    assert invoke(*cli_args(images, out, tiny_weights_dir, "--overwrite")).exit_code == 0


# --------------------------------------------------------------------------- --out and file names


@pytest.mark.parametrize("given", [".", "", "existing/", "existing", "./"])
def test_out_must_name_a_file(
    images: Path, tiny_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
):
    work = tmp_path / "work"
    (work / "existing").mkdir(parents=True)
    monkeypatch.chdir(work)
    result = invoke(images, "--out", given, "--weights", tiny_weights_dir, "--device", "cpu", "-j", 0)
    line = assert_clean_failure(result)
    assert "--out" in line and "a file name" in line, line
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names there are always Unicode")
def test_a_file_name_that_is_not_utf8(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    from mec_hub.cli.hub import main as hub

    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    bad = os.fsdecode(b"bad\xff\xfe.png")
    shutil.copy(folder / "img0001.png", folder / bad)
    out = tmp_path / "f.npy"
    result = invoke(*cli_args(folder, out, tiny_weights_dir))
    assert result.exit_code == 0, result.output

    side(out, ".paths.txt").read_bytes().decode("utf-8")  # strictly UTF-8
    failed = {e["path"]: e["reason"] for e in json.loads(side(out, ".meta.json").read_text())["failed"]}
    assert os.fsencode(next(p for p in failed if p != "broken.png")) == b"bad\xff\xfe.png"
    assert failed[bad].startswith("its name is not valid UTF-8"), failed[bad]
    assert FeatureFile.open(out).paths == side(out, ".paths.txt").read_text().splitlines()

    found = CliRunner().invoke(hub, ["search", str(out), str(folder / "img0003.jpg"), "-k", "1", "--device", "cpu"])
    assert found.exit_code == 0, found.output
    assert "img0003.jpg" in found.output.splitlines()[1]


# --------------------------------------------------------------------------- warnings


@pytest.mark.slow  # 5 s: three mec-embed processes for one warning's display
def test_the_worker_count_warning_is_printed_once(images: Path, tiny_weights_dir: Path, tmp_path: Path):
    run = run_cli_subprocess(*cli_args(images, tmp_path / "f.npy", tiny_weights_dir, "-j", 2), faults={"cpus": 1})
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "2 worker" in warnings[0] and "1 CPU" in warnings[0], run.stderr
