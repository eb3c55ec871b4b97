"""Images made on the spot."""

from __future__ import annotations

from pathlib import Path


def write_noise_images(root: Path, count: int = 16, size: int = 32) -> Path:
    """``count`` PNGs of uniform noise, ``size`` px (seed 0): enough for a tiny pretraining run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / f"{i:02d}.png")
    return root
