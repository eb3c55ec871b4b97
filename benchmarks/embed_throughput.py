"""Embedding throughput: mec-embed's engine against the model alone and a hand-written loop.

Runs, side by side in one process, on the same images (the real photos of
``../shared/data/photos`` repeated to ``--images`` files) and the same weights:

  (a) the model alone on pre-decoded tensors (``Embedder.embed(tensor)``: the ceiling),
  (b) ``Embedder.embed_folder`` end to end (walk, decode in workers, model, streaming writes,
      per-batch checkpoints, final files): what ``mec-embed`` runs,
  (c) the loop a user would write: torchvision ``ImageFolder`` + ``DataLoader`` (no workers) +
      ``timm.create_model("resnet50")``, NCHW, ``torch.no_grad``, the same transform.

The three are interleaved over ``--rounds`` rounds, all with the same batch size (the engine's
default unless ``--batch-size``), and both the best (as ``timeit`` reports: the run least
disturbed by other processes) and the median of each are reported. Targets (2-core CPU, fp32,
ResNet-50 at 224): (b)/(a) >= 0.85 and (b)/(c) >= 1.5. Then bf16 against fp32 on the first
``--bf16-images`` images: cosine similarity >= 0.99.

Weights are random (``mec_hub.load("mec_resnet50", pretrained=False)``; speed does not depend on
them), with every BatchNorm given random statistics and scales: timm zero-initialises the last
BatchNorm of each residual block, which would leave the residual branches silent and make the
bf16 comparison meaningless. Usage: ``python benchmarks/embed_throughput.py [--images 288] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import mec_hub
from mec_hub.embedding.engine import DEFAULT_BATCH_SIZE, Embedder

# The 18 photos shipped with the tests (byte-identical to ../shared/data/photos), so a fresh clone runs it.
PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "photos"  # the shipped photos (tests/assets)


def make_image_folder(root: Path, count: int) -> Path:
    """``root/all/NNNN_<photo>``: the photos repeated (as copies, so page cache and decode are real)."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.is_file())
    folder = root / "all"
    folder.mkdir(parents=True)
    for i in range(count):
        src = photos[i % len(photos)]
        (folder / f"{i:05d}_{src.name}").write_bytes(src.read_bytes())
    return root


def time_model_alone(embedder: Embedder, tensors: torch.Tensor) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    feats = embedder.embed(tensors)
    return time.perf_counter() - start, feats


def time_engine(embedder: Embedder, root: Path, out: Path) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    embedder.embed_folder(root, out, overwrite=True, progress=False)
    elapsed = time.perf_counter() - start
    return elapsed, np.load(out)


def time_hand_loop(
    model: torch.nn.Module, transform: Callable[[Any], torch.Tensor], root: Path, batch_size: int
) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    loader = DataLoader(ImageFolder(str(root), transform=transform), batch_size=batch_size, num_workers=0)
    outs = []
    with torch.no_grad():
        for images, _ in loader:
            outs.append(model(images))
    elapsed = time.perf_counter() - start
    return elapsed, torch.cat(outs).numpy()


def randomise_batchnorms(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=288)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--num-workers", type=int, default=None, help="engine decoding workers (default: its own)")
    parser.add_argument("--bf16-images", type=int, default=64, help="images for the bf16 check (0: skip it)")
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = mec_hub.load("mec_resnet50", pretrained=False)
    randomise_batchnorms(encoder)
    # The hand-written loop's model: plain timm, NCHW, the same weights.
    baseline = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    baseline.load_state_dict(encoder.backbone.state_dict())
    transform = mec_hub.get_transform(encoder)
    embedder = Embedder(encoder, device="cpu", batch_size=args.batch_size, num_workers=args.num_workers)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp) / "images", args.images)
        files = sorted((root / "all").iterdir())
        from mec_hub.data.images import decode_image

        tensors = torch.stack([transform(decode_image(p)) for p in files])
        out = Path(tmp) / "feats.npy"
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {args.images} images, batch {args.batch_size}, "
            f"engine workers {embedder.num_workers}"
        )
        # Warm-up (allocator, oneDNN kernel choice, file cache).
        embedder.embed(tensors[: args.batch_size])
        with torch.no_grad():
            baseline(tensors[: args.batch_size])

        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for r in range(args.rounds):
            ta, fa = time_model_alone(embedder, tensors)
            tb, fb = time_engine(embedder, root, out)
            tc, fc = time_hand_loop(baseline, transform, root, args.batch_size)
            for key, t in zip("abc", (ta, tb, tc), strict=True):
                times[key].append(t)
            print(
                f"round {r + 1}: (a) {args.images / ta:6.2f} img/s  (b) {args.images / tb:6.2f} img/s  "
                f"(c) {args.images / tc:6.2f} img/s   b/a {ta / tb:.3f}  b/c {tc / tb:.3f}"
            )
        # Same numbers from all three (channels-last vs NCHW differ only by float rounding).
        scale = np.abs(fc).max()
        print(
            f"max |b - c| = {np.abs(fb - fc).max():.2e} and max |a - b| = {np.abs(fa - fb).max():.2e} "
            f"for features up to {scale:.3g}"
        )
        for label, pick in (("best", min), ("median", statistics.median)):
            t = {k: pick(v) for k, v in times.items()}
            print(
                f"{label}: (a) {args.images / t['a']:.2f} img/s, (b) {args.images / t['b']:.2f} img/s, "
                f"(c) {args.images / t['c']:.2f} img/s;  (b)/(a) = {t['a'] / t['b']:.3f} (target >= 0.85), "
                f"(b)/(c) = {t['c'] / t['b']:.3f} (target >= 1.5)"
            )

        if args.bf16_images:
            some = files[: args.bf16_images]
            bf16 = Embedder(encoder, device="cpu", precision="bf16", batch_size=args.batch_size,
                            num_workers=args.num_workers)
            start = time.perf_counter()
            f16 = bf16.embed(some)
            t16 = time.perf_counter() - start
            cos = cosine_rows(fb[: len(some)].astype(np.float64), f16.astype(np.float64))
            print(
                f"bf16 on {len(some)} images: {len(some) / t16:.2f} img/s; cosine similarity to fp32: "
                f"min {cos.min():.5f}, mean {cos.mean():.5f} (target >= 0.99)"
            )


if __name__ == "__main__":
    main()
