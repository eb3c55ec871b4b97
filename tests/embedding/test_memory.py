"""Peak memory of a run does not grow with the number of images (features stream to disk)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.embedding import run_in_own_group, subprocess_env

# Identity "model" with a wide output (D = 3 * 32 * 32 = 3072): holding 2,000 rows in memory would
# take 24.6 MB, far above the bound below, while the model itself costs nothing.
SCRIPT = """
import json, resource, sys
import numpy as np
import torch
from mec_hub.embedding.engine import Embedder

model = torch.nn.Flatten()
model.pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}
embedder = Embedder(model, device="cpu", batch_size=50, num_workers=1)
result = embedder.embed_folder([], sys.argv[2], files_from=sys.argv[1], progress=False)
features = np.load(sys.argv[2], mmap_mode="r")
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "shape": list(features.shape),
                  "row0_mean": float(features[0].mean())}))
"""
GROWTH_BOUND_MIB = 8


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_does_not_grow_with_n(tmp_path: Path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2000):
        path = images / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, compress_level=1)
        paths.append(path)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)

    peaks = {}
    for n in (200, 2000):
        listing = tmp_path / f"list{n}.txt"
        listing.write_text("".join(f"{p}\n" for p in paths[:n]))
        done = run_in_own_group([sys.executable, str(script), str(listing), str(tmp_path / f"f{n}.npy")],
                                timeout=300, env=subprocess_env())
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["shape"] == [n, 3072]
        peaks[n] = report["peak_kib"] / 1024
    growth = peaks[2000] - peaks[200]
    held = 1800 * 3072 * 4 / 2**20  # what keeping the extra rows in memory would cost
    assert growth < GROWTH_BOUND_MIB < held, f"peak RSS {peaks[200]:.1f} -> {peaks[2000]:.1f} MiB"
