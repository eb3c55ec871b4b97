"""Run ``mec-embed`` with a fault injected, for the tests that need a run to die, stall or crash.

    python tests/embed_driver.py [FAULT...] -- MEC-EMBED-ARGS...

Faults:
  --kill-after-batches N  SIGKILL this process once the rows of its N-th batch are on disk, before
                          the checkpoint that counts them (the worst moment for a crash).
  --batch-delay S         sleep S seconds after every batch (through ``on_commit``, the job's
                          progress hook), so that a test can interrupt the run in the middle.
  --crash-on TEXT         in a decoding worker process, an image whose path contains TEXT kills
  --hang-on TEXT          the process (SIGSEGV) or hangs it, as a broken image decoder would.

The faults are installed here, in the test process, by wrapping the package's functions; the
package itself has no test hooks.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time


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


def break_decoder(crash_on: str | None, hang_on: str | None) -> None:
    from mec_hub.embedding import loader

    main_pid = os.getpid()
    decode_image = loader.decode_image

    def broken_decode_image(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.getpid() != main_pid:  # in a worker process, where a real decoder crash would happen
            if crash_on and crash_on in str(path):
                os.kill(os.getpid(), signal.SIGSEGV)
            if hang_on and hang_on in str(path):
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
    faults = parser.parse_args(argv[:split])
    if faults.kill_after_batches:
        kill_after_batches(faults.kill_after_batches)
    if faults.batch_delay:
        delay_batches(faults.batch_delay)
    if faults.crash_on or faults.hang_on:
        break_decoder(faults.crash_on, faults.hang_on)

    from mec_hub.cli.embed import main as mec_embed

    mec_embed(argv[split + 1 :], prog_name="mec-embed")


if __name__ == "__main__":
    main(sys.argv[1:])
