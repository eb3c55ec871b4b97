"""The default runtime against the fastest one measured, and int8 against fp32: side by side in one run.

Part 1, speed. A ResNet-50 at 224 px (random weights: ``mec_hub.load("mec_resnet50", pretrained=False)``
with random BatchNorm statistics and scales, written to a converted folder; speed does not depend on
the values). The same preprocessed ``(N, 3, 224, 224)`` float32 batches go through, interleaved over
``--rounds`` rounds, each after a warm-up:

  (a) ``Embedder(runtime="torch")``: PyTorch as ``mec-embed`` ran it before (BatchNorm folded, channels-last);
  (b) ``Embedder()``: the default (``runtime="auto"``: ONNX Runtime through the cached export);
  (c) a bare ``onnxruntime.InferenceSession`` on the same file (no engine around it), as many threads;
  (t) with ``--compile``: ``torch.compile`` of (a)'s model (inductor), compile time reported apart;
  (q) ``Embedder(precision="int8")``: calibrated on ``--calibration-images`` of the batches (the
      agreement targets off: random weights make recall@10 meaningless; part 2 measures agreement).

Reported: images/s (best and median round), (b) / fastest of (a), (c), (t) (target >= 0.9), (q) / (b)
(target >= 1.5), the relative differences to (a), and the time to make the export once.

Part 2, int8 agreement on real images (random weights say nothing about it): the bundled model
``mec_resnet18_cifar10s`` (real trained weights) embeds ``--real`` images (default: up to 256 of
``../shared/data/cifar10-subset/test``) in fp32 (PyTorch) and int8; printed are the figures int8 records
(mean and minimum cosine with fp32 ONNX Runtime, recall@10 of a search against the fp32 rows) and the
same figures recomputed here against the eager PyTorch rows.

Usage: ``python benchmarks/runtime_speed.py [--images 64] [--batch-size 16] [--rounds 3] [--threads N]
[--compile] [--calibration-images 64] [--real DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mec_hub
from benchmarks.export_speed import randomise_batchnorms  # the same random model as that benchmark
from mec_hub.embedding.engine import Embedder
from mec_hub.export import quantize
from mec_hub.export.convert import ExtractedWeights, write_hub_folder
from mec_hub.export.quantize import agreement

ROOT = Path(__file__).resolve().parents[1]


def max_rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64) - ref).max() / np.abs(ref).max())


def speed(args: argparse.Namespace, cache: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    encoder = mec_hub.load("mec_resnet50", pretrained=False)
    randomise_batchnorms(encoder)
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    folder = cache.parent / "resnet50"
    extracted = ExtractedWeights(
        architecture="resnet50", backbone=encoder.backbone.state_dict(), projector=None, layout="random weights"
    )
    write_hub_folder(extracted, folder)
    common = {"weights": folder, "device": "cpu", "batch_size": args.batch_size, "num_workers": 0}
    torch_engine = Embedder(**common, runtime="torch")
    started = time.perf_counter()
    default = Embedder(**common)
    made_s = time.perf_counter() - started
    started = time.perf_counter()
    Embedder(**common)
    cached_s = time.perf_counter() - started
    assert default.runtime == "onnxruntime", default.runtime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    onnx_file = cache / "onnx" / default.record()["onnx_export"]["cache_entry"] / "model.onnx"
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    int8 = Embedder(**common, precision="int8")
    # Random weights map every image to nearly the same vector, so recall@10 against fp32 means nothing
    # here and the check is off for this part; part 2 measures agreement with real weights on real images.
    targets = dict(quantize.TARGETS)
    quantize.TARGETS.update(cosine_mean=0.0, recall_at_10=0.0)
    try:
        int8.embed(images[: args.calibration_images])  # calibrates on these
    finally:
        quantize.TARGETS.update(targets)
    int8_s = time.perf_counter() - started
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; ResNet-50 at 224, "
        f"{args.images} images in batches of {args.batch_size}. Export made once in {made_s:.1f} s (Embedder "
        f"construction with it), found in the cache in {cached_s:.2f} s; int8 quantization and check on "
        f"{args.calibration_images} images {int8_s:.1f} s; {int8.int8_agreement.summary()} (random weights)"
    )

    def bare() -> np.ndarray:
        array, step = images.numpy(), args.batch_size
        blocks = [session.run(None, {"images": array[i : i + step]})[0] for i in range(0, len(array), step)]
        return np.concatenate(blocks)

    runs: dict[str, Callable[[], np.ndarray]] = {
        "a": lambda: torch_engine.embed(images),
        "b": lambda: default.embed(images),
        "c": bare,
        "q": lambda: int8.embed(images),
    }
    if args.compile:
        compiled = torch.compile(torch_engine._runner)
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(images[: args.batch_size].contiguous(memory_format=torch.channels_last))
        print(f"torch.compile: first call (compilation) {time.perf_counter() - started:.1f} s")

        def run_compiled() -> np.ndarray:
            with torch.inference_mode():
                return torch.cat(
                    [compiled(b.contiguous(memory_format=torch.channels_last)) for b in images.split(args.batch_size)]
                ).numpy()

        runs["t"] = run_compiled
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {key: [] for key in runs}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for key, run in runs.items():
            started = time.perf_counter()
            outputs[key] = run()
            times[key].append(time.perf_counter() - started)
        print(f"round {r + 1}: " + "  ".join(f"({k}) {args.images / times[k][-1]:6.2f} img/s" for k in runs))
    ref = outputs["a"].astype(np.float64)
    print("max relative difference to (a): " + ", ".join(f"({k}) {max_rel(outputs[k], ref):.1e}" for k in runs))
    for label, pick in (("best", min), ("median", statistics.median)):
        t = {k: pick(v) for k, v in times.items()}
        fastest = min((k for k in t if k != "q"), key=t.get)
        print(
            f"{label}: " + ", ".join(f"({k}) {args.images / t[k]:.2f} img/s" for k in t)
            + f";  default (b) / fastest ({fastest}) = {t[fastest] / t['b']:.2f} (target >= 0.9);"
            f"  (b)/(a) = {t['a'] / t['b']:.2f};  int8 (q)/(b) = {t['b'] / t['q']:.2f} (target >= 1.5)"
        )


def real_agreement(args: argparse.Namespace) -> None:
    from PIL import Image

    folder = Path(args.real)
    if not folder.is_dir():
        print(f"part 2 skipped: {folder} not found")
        return
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files = files[:: max(1, len(files) // args.real_images)][: args.real_images]
    model = mec_hub.load("mec_resnet18_cifar10s")
    transform = mec_hub.get_transform(model)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    with torch.no_grad():
        eager = model(batch).numpy()
    int8 = Embedder("mec_resnet18_cifar10s", device="cpu", precision="int8")
    quantized = int8.embed([str(p) for p in files])
    fp32 = Embedder("mec_resnet18_cifar10s", device="cpu")
    timings = {}
    for name, engine in (("torch", Embedder("mec_resnet18_cifar10s", device="cpu", runtime="torch")),
                         ("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        engine.embed(batch)
        started = time.perf_counter()
        for _ in range(3):
            engine.embed(batch)
        timings[name] = 3 * len(batch) / (time.perf_counter() - started)
    print(
        f"bundled model mec_resnet18_cifar10s (48 px), {len(files)} images of {folder}: recorded "
        f"{int8.int8_agreement.summary()}; recomputed against eager PyTorch: {agreement(eager, quantized).summary()}"
    )
    print("  speed on the same tensors: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in timings.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset" / "test"))
    parser.add_argument("--real-images", type=int, default=256)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        os.environ["MEC_HUB_CACHE"] = str(cache)  # an empty cache: the export is made in this run
        os.environ.pop("MEC_HUB_RUNTIME", None)
        speed(args, cache)
        real_agreement(args)


if __name__ == "__main__":
    main()
