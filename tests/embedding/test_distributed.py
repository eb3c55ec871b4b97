"""Two processes under torchrun (gloo, CPU) write the same files as one process."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main
from mec_hub.runtime.distributed import batch_aligned_slice
from tests.support.embedding import make_images, meta_without_times, run_in_own_group, subprocess_env

BATCH = 4


def test_slices_are_contiguous_whole_batches():
    for n in (0, 1, 7, 8, 9, 23, 100):
        for world in (1, 2, 3, 5):
            slices = [batch_aligned_slice(n, BATCH, rank, world) for rank in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == n
            for (_, end), (start, _) in itertools.pairwise(slices):
                assert end == start
            assert all(start % BATCH == 0 for start, _ in slices)
            sizes = [-(-(end - start) // BATCH) for start, end in slices]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Windows is not tested")
def test_two_processes_equal_one(tiny_weights_dir: Path, odd_images_dir: Path, tmp_path: Path):
    images = tmp_path / "imgs"
    make_images(images, 17)
    (images / "empty.png").write_bytes(b"")
    common = [str(images), str(odd_images_dir / "truncated.png"), "--weights", str(tiny_weights_dir),
              "--device", "cpu", "-b", str(BATCH), "-j", "0"]

    single = tmp_path / "one" / "f.npy"
    result = CliRunner().invoke(main, [*common, "--out", str(single)])
    assert result.exit_code == 0, result.output

    double = tmp_path / "two" / "f.npy"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mec_hub.cli.embed", *common, "--out", str(double), "-q"]
    done = run_in_own_group(command, timeout=240, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]

    np.testing.assert_allclose(np.load(double), np.load(single), rtol=1e-6, atol=1e-6)
    assert (double.parent / "f.paths.txt").read_text() == (single.parent / "f.paths.txt").read_text()
    meta_two = json.loads((double.parent / "f.meta.json").read_text())
    meta_one = json.loads((single.parent / "f.meta.json").read_text())
    assert meta_without_times(meta_two) == meta_without_times(meta_one)
    assert meta_one["num_failed"] == 2 and meta_one["num_embedded"] == 17
    assert sorted(p.name for p in double.parent.iterdir()) == ["f.meta.json", "f.npy", "f.paths.txt"]
