"""Export speed: ONNX Runtime against PyTorch on this CPU, side by side in one run, same batches.

A ResNet-50 at 224 px (random weights: ``mec_hub.load("mec_resnet50", pretrained=False)`` with
random BatchNorm statistics and scales, written to a converted folder; speed does not depend on
the values) is exported by ``mec-hub export``'s code (``export_model``, ONNX, ``--dynamic-batch``)
and the same preprocessed ``(N, 3, 224, 224)`` float32 batches go through, interleaved over
``--rounds`` rounds:

  (a) PyTorch, the model as ``mec_hub.load`` returns it: NCHW, ``torch.no_grad``;
  (b) PyTorch as ``mec-embed`` runs it: ``Embedder.embed(tensor)`` (BatchNorm folded, channels-last);
  (c) ONNX Runtime through the same engine: ``Embedder(runtime="onnxruntime").embed(tensor)``
      (what ``mec-embed --runtime onnxruntime`` runs; CPU execution provider, as many threads as torch).

Reports images/s (best and median round) and the largest relative difference of (b) and (c)
from (a) (max |x - a| / max |a|). Usage: ``python benchmarks/export_speed.py [--images 48]
[--batch-size 16] [--rounds 3] [--threads N]``.
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

import numpy as np
import torch

import mec_hub
from mec_hub.embedding.engine import Embedder
from mec_hub.export.convert import ExtractedWeights, write_hub_folder
from mec_hub.export.deploy import export_model


def randomise_batchnorms(model: torch.nn.Module) -> None:
    """timm zero-initialises each block's last BatchNorm scale: give every BatchNorm real numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)


def timed(run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def max_rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64) - ref).max() / np.abs(ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of both (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime follows it (OnnxRuntimeModel's default)

    import onnxruntime

    torch.manual_seed(0)
    encoder = mec_hub.load("mec_resnet50", pretrained=False)
    randomise_batchnorms(encoder)
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "resnet50"
        extracted = ExtractedWeights(
            architecture="resnet50", backbone=encoder.backbone.state_dict(), projector=None, layout="random weights"
        )
        write_hub_folder(extracted, folder)
        start = time.perf_counter()
        exported = export_model(folder, Path(tmp) / "resnet50.onnx", fmt="onnx", dynamic_batch=True)
        export_s = time.perf_counter() - start
        model = mec_hub.load(weights=folder)
        torch_engine = Embedder(model, device="cpu", batch_size=args.batch_size, num_workers=0)
        ort_engine = Embedder(
            runtime="onnxruntime", weights=exported.path, device="cpu", batch_size=args.batch_size, num_workers=0
        )
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; ResNet-50 at 224, fp32, "
            f"{args.images} images in batches of {args.batch_size}; export took {export_s:.1f} s "
            f"(opset 18, {exported.path.stat().st_size / 1e6:.1f} MB)"
        )

        def eager() -> np.ndarray:
            with torch.no_grad():
                return torch.cat([model(b) for b in images.split(args.batch_size)]).numpy()

        runs: dict[str, Callable[[], np.ndarray]] = {
            "a": eager,
            "b": lambda: torch_engine.embed(images),
            "c": lambda: ort_engine.embed(images),
        }
        for run in runs.values():  # warm-up: allocator, kernel choice, ORT's first-run graph work
            run()
        times: dict[str, list[float]] = {key: [] for key in runs}
        outputs: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for key, run in runs.items():
                elapsed, outputs[key] = timed(run)
                times[key].append(elapsed)
            print(
                f"round {r + 1}: "
                + "  ".join(f"({k}) {args.images / times[k][-1]:6.2f} img/s" for k in runs)
                + f"   c/a {times['a'][-1] / times['c'][-1]:.2f}  c/b {times['b'][-1] / times['c'][-1]:.2f}"
            )
        ref = outputs["a"].astype(np.float64)
        print(
            f"max relative difference to (a): (b) {max_rel(outputs['b'], ref):.1e}, "
            f"(c) {max_rel(outputs['c'], ref):.1e}"
        )
        for label, pick in (("best", min), ("median", statistics.median)):
            t = {k: pick(v) for k, v in times.items()}
            print(
                f"{label}: (a) {args.images / t['a']:.2f} img/s, (b) {args.images / t['b']:.2f} img/s, "
                f"(c) {args.images / t['c']:.2f} img/s;  (c)/(a) = {t['a'] / t['c']:.2f}, "
                f"(c)/(b) = {t['b'] / t['c']:.2f}"
            )


if __name__ == "__main__":
    main()
