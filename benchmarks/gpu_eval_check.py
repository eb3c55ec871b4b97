"""The supervised evaluations on a GPU, in one short run: they run, in fp32 and bf16, and how fast.

    python benchmarks/gpu_eval_check.py            # on a machine with a GPU
    python benchmarks/gpu_eval_check.py --tiny     # CPU, toy sizes: a crash test

A random-weight ResNet-50 (``mec_resnet50``, ``random_init``: no download) under the authors' linear
protocol (``mec-hub eval linear --protocol paper``) and under semi-supervised fine-tuning, at 224 px,
on a generated ImageFolder (3 classes of 64 px noise-and-stripes images), 2 epochs each. Prints one
line per run (top-1, seconds, training images/s of the second epoch) and the GPU's name; nothing is
written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mec_hub.evaluation.supervised import run_finetune, run_linear_paper


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, step in (("a", 3), ("b", 5), ("c", 7)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((64, 64, 3)) * 160).astype("uint8")
            pixels[:, ::step] = 255
            Image.fromarray(pixels).save(root / label / f"{label}{i:04d}.png")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, toy sizes")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; use --tiny for a CPU crash test")
    name = "CPU" if args.tiny else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    per_class, batch, workers = (8, 8, 0) if args.tiny else (512, 256, 8)
    common = {"name": "mec_resnet50", "random_init": True, "device": device, "num_workers": workers, "epochs": 2}
    with tempfile.TemporaryDirectory() as tmp:
        train = write_folder(Path(tmp) / "train", per_class, 0)
        val = write_folder(Path(tmp) / "val", max(4, per_class // 4), 1)
        runs = [
            ("linear --protocol paper, fp32", run_linear_paper, {"precision": "fp32", "batch_size": batch}),
            ("linear --protocol paper, bf16", run_linear_paper, {"precision": "bf16", "batch_size": batch}),
            ("finetune 50%, bf16", run_finetune, {"precision": "bf16", "labels_fraction": 0.5, "batch_size": batch}),
        ]
        for index, (label, run, options) in enumerate(runs):
            started = time.perf_counter()
            out = Path(tmp) / f"run{index}"
            report = run(train, val, output_dir=out, log=lambda *a, **k: None, **common, **options)
            seconds = time.perf_counter() - started
            last = report.params["history"][-1]
            images = report.data["train"]["count"]
            print(
                f"{label}: top-1 {report.results['top1']:.1f}% on {report.data['val']['count']} images, "
                f"{seconds:.1f} s in all, epoch 2 {last['seconds']:.2f} s "
                f"({images / last['seconds']:.0f} training images/s with validation)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
