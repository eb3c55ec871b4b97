"""Stress: two-process pretraining (torchrun, gloo, CPU) again and again under glibc's heap checks.

Issue 21 item 17: once in a full-suite run, process 1 of the two-process pretraining died with
``malloc(): unaligned tcache chunk detected`` (SIGABRT) right after the step-2 checkpoint. Heap
misuse of that kind (a buffer written after it was freed) shows only now and then; glibc's
checks make it fail fast and loudly: ``MALLOC_PERTURB_`` fills every freed and every new block
with a byte pattern (a buffer read after its free then holds junk, and the weights drift from
the other runs'), and ``MALLOC_CHECK_=3`` (glibc's debugging malloc, which glibc 2.34 and later
load only through ``LD_PRELOAD=libc_malloc_debug.so.0``) checks each block on free. Every run
must exit 0 and reach the weights of the first: a run is a function of its seed, whatever the
timing between the processes.

Slow (several minutes on 2 cores) and off by default: ``MEC_HUB_STRESS=1`` runs it,
``MEC_HUB_STRESS_RUNS=N`` sets the number of runs (default 5). ``PYTHONFAULTHANDLER`` is on, so a
run that aborts prints the Python stack of every thread of the process that died.
"""

from __future__ import annotations

import glob
import os
import signal
import sys

import pytest
import torch

from tests.support.embedding import run_in_own_group, subprocess_env
from tests.support.paths import REPO_ROOT
from tests.support.pretraining import WORLD, pretrain_arguments

SCRIPT = REPO_ROOT / "training" / "pretrain.py"
RUNS = int(os.environ.get("MEC_HUB_STRESS_RUNS", "5"))
RUN_TIMEOUT_S = 600
# glibc's debugging malloc: without it (glibc >= 2.34), MALLOC_CHECK_ is ignored.
MALLOC_DEBUG_GLOBS = (
    "/lib*/libc_malloc_debug.so.0",
    "/usr/lib*/libc_malloc_debug.so.0",
    "/usr/lib/*/libc_malloc_debug.so.0",
)
PERTURB_BYTE = "165"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("MEC_HUB_STRESS"), reason="stress test: set MEC_HUB_STRESS=1 to run it"),
    pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Windows is not tested"),
]


def malloc_debug_library() -> str | None:
    """The path of glibc's ``libc_malloc_debug.so.0``; ``None`` on older glibc (checks built in), musl, macOS."""
    for pattern in MALLOC_DEBUG_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def heap_checked_env() -> dict[str, str]:
    """The environment of a run: glibc's heap checks on, Python stacks at a fatal signal, one thread per process."""
    extra = {
        "MALLOC_CHECK_": "3",
        "MALLOC_PERTURB_": PERTURB_BYTE,
        "PYTHONFAULTHANDLER": "1",
        "OMP_NUM_THREADS": "1",
    }
    library = malloc_debug_library()
    if library is not None:
        extra["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    return subprocess_env(**extra)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def test_heap_checks_reach_the_run_processes(tmp_path):
    """The checks are really on in the processes torchrun starts: a new block comes filled with ~MALLOC_PERTURB_."""
    if malloc_debug_library() is None:
        pytest.skip("no libc_malloc_debug.so.0 (glibc >= 2.34) to check the environment against")
    probe = tmp_path / "fresh_block.py"
    probe.write_text(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None)  # the process's malloc, the preloaded one included\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "block = libc.malloc(40)\n"
        "print(f\"rank {os.environ['RANK']}: {sorted(set(ctypes.string_at(block, 40)))}\", flush=True)\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(probe)]
    done = run_in_own_group(command, timeout=RUN_TIMEOUT_S, env=heap_checked_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    filler = int(PERTURB_BYTE) ^ 0xFF  # glibc fills new blocks with the complement of the perturb byte
    assert sorted(done.stdout.splitlines()) == [f"rank {rank}: [{filler}]" for rank in range(WORLD)], done.stdout


def test_two_process_runs_survive_heap_checks_and_agree(images, tmp_path):
    reference: dict[str, torch.Tensor] | None = None
    for run in range(RUNS):
        out = tmp_path / f"run{run}"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(SCRIPT),
            *pretrain_arguments(images, out),
        ]  # fmt: skip
        done = run_in_own_group(command, timeout=RUN_TIMEOUT_S, env=heap_checked_env())
        assert done.returncode == 0, (
            f"run {run + 1} of {RUNS}: torchrun {describe_exit(done.returncode)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
        state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
        assert (state["step"], state["world_size"]) == (4, WORLD)
        if reference is None:
            reference = state["model"]
            continue
        assert state["model"].keys() == reference.keys()
        for key, value in reference.items():
            # Bit for bit: the same seed, world size and thread count give the same arithmetic.
            assert torch.equal(state["model"][key], value), f"run {run + 1} of {RUNS}: {key} differs from run 1"
