"""Run ``mec-embed`` with a fault injected, for the tests that need a run to die, stall or crash.

    python tests/support/embed_driver.py [FAULT...] -- MEC-EMBED-ARGS...

Faults:
  --kill-after-batches N  SIGKILL this process once the rows of its N-th batch are on disk, before
                          the checkpoint that counts them (the worst moment for a crash).
  --batch-delay S         sleep S seconds after every batch (through ``on_commit``, the job's
                          progress hook), so that a test can interrupt the run in the middle.
  --crash-on TEXT         in a decoding worker process, an image whose path contains TEXT kills
  --hang-on TEXT          the process (SIGSEGV) or hangs it, as a broken image decoder would.
  --hang-mark FILE        a worker that starts hanging appends its process id to FILE first.
  --disk-full-after-batches N
                          the rows of the N-th batch fail to be written: ENOSPC, as on a full disk.
  --disk-full-at-publish N
  --kill-at-publish N     the N-th rename that puts a final file (FEATS.npy, FEATS.paths.txt,
                          FEATS.meta.json) in place fails with ENOSPC, or is followed by SIGKILL.
  --cpus N                the machine seems to have N CPUs (what the worker-count warning reads).

The faults are installed here, in the test process, by wrapping the package's functions; the
package itself has no test hooks. Tests that need no kill install the disk faults in their own
process, through ``monkeypatch.setattr`` (the ``setattr`` argument).
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

Setattr = Callable[[Any, str, Any], None]


def kill_after_batches(count: int) -> None:
    from mec_hub.embedding.npy_writer import NpyRowWriter

    sync = NpyRowWriter.sync
    synced = 0

    def sync_then_die(self: NpyRowWriter) -> None:  # one sync per batch, just before its checkpoint
        nonlocal synced
        sync(self)
        synced += 1
        if synced == count:
            os.kill(os.getpid(), signal.SIGKILL)

    NpyRowWriter.sync = sync_then_die  # type: ignore[method-assign]


def delay_batches(seconds: float) -> None:
    from mec_hub.embedding.engine import Embedder

    embed_folder = Embedder.embed_folder

    def slow_embed_folder(self: Embedder, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return embed_folder(self, *args, on_commit=lambda progress: time.sleep(seconds), **kwargs)  # type: ignore[arg-type]

    Embedder.embed_folder = slow_embed_folder  # type: ignore[method-assign]


def disk_full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def disk_full_after_batches(count: int, setattr: Setattr = setattr) -> None:
    from mec_hub.embedding.npy_writer import NpyRowWriter

    append = NpyRowWriter.append
    appended = 0

    def append_until_full(self: NpyRowWriter, block) -> None:  # type: ignore[no-untyped-def]
        nonlocal appended
        appended += 1
        if appended == count:
            raise disk_full(self.path)
        append(self, block)

    setattr(NpyRowWriter, "append", append_until_full)


FINAL_SUFFIXES = (".npy", ".paths.txt", ".meta.json")


def fail_publish(count: int, *, kill: bool, setattr: Setattr = setattr) -> None:
    """The ``count``-th ``os.replace`` onto a final output name fails (ENOSPC) or is followed by SIGKILL."""
    replace = os.replace
    published = 0

    def replace_and_fail(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal published
        name = os.path.basename(os.fspath(dst))
        if name.startswith(".") or not name.endswith(FINAL_SUFFIXES):
            return replace(src, dst, *args, **kwargs)
        published += 1
        if published == count and not kill:
            raise disk_full(dst)
        replace(src, dst, *args, **kwargs)
        if published == count:
            os.kill(os.getpid(), signal.SIGKILL)

    setattr(os, "replace", replace_and_fail)


def pretend_cpus(count: int) -> None:
    os.cpu_count = lambda: count
    if hasattr(os, "sched_getaffinity"):
        os.sched_getaffinity = lambda pid: set(range(count))


def break_decoder(crash_on: str | None, hang_on: str | None, hang_mark: str | None) -> None:
    from mec_hub.embedding import loader

    main_pid = os.getpid()
    decode_image = loader.decode_image

    def broken_decode_image(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.getpid() != main_pid:  # in a worker process, where a real decoder crash would happen
            if crash_on and crash_on in str(path):
                os.kill(os.getpid(), signal.SIGSEGV)
            if hang_on and hang_on in str(path):
                if hang_mark:
                    with open(hang_mark, "a") as fh:
                        fh.write(f"{os.getpid()}\n")
                time.sleep(3600)
        return decode_image(path, *args, **kwargs)

    loader.decode_image = broken_decode_image
    multiprocessing.set_start_method("fork", force=True)  # so that the worker processes inherit the fault


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="embed_driver.py")
    parser.add_argument("--kill-after-batches", type=int)
    parser.add_argument("--batch-delay", type=float)
    parser.add_argument("--crash-on")
    parser.add_argument("--hang-on")
    parser.add_argument("--hang-mark")
    parser.add_argument("--disk-full-after-batches", type=int)
    parser.add_argument("--disk-full-at-publish", type=int)
    parser.add_argument("--kill-at-publish", type=int)
    parser.add_argument("--cpus", type=int)
    faults = parser.parse_args(argv[:split])
    if faults.kill_after_batches:
        kill_after_batches(faults.kill_after_batches)
    if faults.batch_delay:
        delay_batches(faults.batch_delay)
    if faults.crash_on or faults.hang_on:
        break_decoder(faults.crash_on, faults.hang_on, faults.hang_mark)
    if faults.disk_full_after_batches:
        disk_full_after_batches(faults.disk_full_after_batches)
    if faults.disk_full_at_publish or faults.kill_at_publish:
        fail_publish(faults.disk_full_at_publish or faults.kill_at_publish, kill=bool(faults.kill_at_publish))
    if faults.cpus:
        pretend_cpus(faults.cpus)

    from mec_hub.cli.embed import main as mec_embed

    mec_embed(argv[split + 1 :], prog_name="mec-embed")


if __name__ == "__main__":
    main(sys.argv[1:])
