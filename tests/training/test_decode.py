"""Training and serving see the same pixels: one decode path for the training dataset and ``Embedder``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms

from mec_hub import Embedder
from training.data import TwoViewImages, find_images

HEIGHT, WIDTH = 24, 16  # of both images as displayed
_EXIF_ORIENTATION = 0x0112


def write_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored sideways (WIDTH rows, HEIGHT columns) whose EXIF says: rotate 90 degrees clockwise.

    Returns the reference: the stored pixels as Pillow decodes them, rotated by numpy.
    """
    stored = np.zeros((WIDTH, HEIGHT, 3), np.uint8)
    stored[: WIDTH // 2, : HEIGHT // 2] = (230, 30, 30)  # four flat quadrants survive JPEG well
    stored[: WIDTH // 2, HEIGHT // 2 :] = (30, 230, 30)
    stored[WIDTH // 2 :, : HEIGHT // 2] = (30, 30, 230)
    stored[WIDTH // 2 :, HEIGHT // 2 :] = (230, 230, 30)
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6  # "the 0th row is the visual right-hand side": rotate 90 clockwise
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:
        decoded = np.asarray(raw.convert("RGB"))  # the stored pixels, not rotated
        upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    expected = np.rot90(decoded, k=-1)  # clockwise
    assert np.array_equal(upright, expected)  # Pillow's and numpy's rotations agree
    return expected


def write_transparent_png(path: Path) -> np.ndarray:
    """An RGBA PNG, a third each transparent, half and fully opaque, over random colours.

    Returns the reference: the colours composited over white by numpy.
    """
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[:8, :, 3], rgba[8:16, :, 3], rgba[16:, :, 3] = 0, 128, 255
    Image.fromarray(rgba, "RGBA").save(path)
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


class Pixels(nn.Module):
    """A "model" whose features are its input: what the embedder decoded, as floats in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained_cfg = {  # what mec_hub.load sets on its models
            "input_size": [3, HEIGHT, WIDTH],
            "interpolation": "bilinear",
            "crop_pct": 1.0,  # no resize, no crop at the images' own size
            "crop_mode": "center",
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def to_uint8(chw: torch.Tensor) -> np.ndarray:
    return np.rint(chw.numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)


@pytest.fixture
def images(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    references = {
        "rotated.jpg": write_rotated_jpeg(tmp_path / "rotated.jpg"),
        "transparent.png": write_transparent_png(tmp_path / "transparent.png"),
    }
    return tmp_path, references


def test_training_and_embedding_decode_the_same_pixels(images):
    root, references = images
    names = find_images(root)
    assert names == sorted(references)
    to_tensor = transforms.ToTensor()
    dataset = TwoViewImages(root, (to_tensor, to_tensor))
    trained = {name: to_uint8(dataset[(0, i)][0]) for i, name in enumerate(dataset.files)}

    embedder = Embedder(Pixels(), device="cpu", num_workers=0, optimize=False)
    features = embedder.embed([str(root / name) for name in names])
    served = {
        name: np.rint(row.reshape(3, HEIGHT, WIDTH).transpose(1, 2, 0) * 255.0).astype(np.uint8)
        for name, row in zip(names, features, strict=True)
    }

    for name, expected in references.items():
        assert trained[name].shape == (HEIGHT, WIDTH, 3), name  # the JPEG is rotated upright
        assert np.array_equal(trained[name], served[name]), name
        # Pillow composites in integers: within one level of the float reference.
        difference = np.abs(trained[name].astype(int) - expected.astype(int))
        assert difference.max() <= 1, (name, difference.max())
    transparent = trained["transparent.png"]
    assert (transparent[:8] == 255).all()  # fully transparent pixels are white, not their stored colour


def test_unreadable_images_warn_with_the_decoders_reason(images):
    root, _ = images
    (root / "empty.png").write_bytes(b"")
    to_tensor = transforms.ToTensor()
    dataset = TwoViewImages(root, (to_tensor, to_tensor))
    broken = dataset.files.index("empty.png")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*empty\.png: empty file \(0 bytes\)"):
        view, _ = dataset[(0, broken)]
    replacement = dataset[(0, broken + 1)][0]  # the next file stands in for it
    assert torch.equal(view, replacement)
