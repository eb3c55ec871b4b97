"""The GPU checks of the MEC pretraining code, in one short run (``benchmarks/gpu_check.sh`` calls this).

1. The loss at the paper's sizes (m = 1024, d = 2048, fp32), forward + backward: exact
   log-determinant vs our order-4 Taylor form vs the official power-by-power series.
2. ResNet-50 MEC training steps at batch 256 (224 px, synthetic images, no data loading):
   images/s in fp32 vs bf16 + channels-last, and the share of a step spent outside the network.
3. ``training/pretrain.py`` end to end on the GPU (generated images, bf16, channels-last,
   data-loading workers, checkpoint, export, reload): it runs, and how fast.

Results go to stdout and, with ``--results FILE``, are appended to that Markdown file with the
GPU's name. ``--tiny`` runs the same code on the CPU at toy sizes (a crash test, no results file).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loss_speed import power_series
from benchmarks.step_overhead import measure, timed
from mec_hub.models.losses import coding_length
from training.metrics import read_metrics

PAPER = {"m": 1024, "d": 2048, "arch": "resnet50", "image": 224, "batch": 256, "e2e_arch": "resnet18", "e2e_image": 64}
TINY = {"m": 64, "d": 128, "arch": "resnet10t", "image": 32, "batch": 8, "e2e_arch": "resnet10t", "e2e_image": 32}


def loss_times(m: int, d: int, device: torch.device, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(m, d, generator=g)
    z1, z2 = z1.to(device), (z1 + 0.5 * torch.randn(m, d, generator=g)).to(device)
    lamda = d / (m * 64.0)

    def run(fn):
        def call():
            a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
            fn(a, b).backward()

        return timed(call, device, repeats, warmup=3)

    return {
        "exact logdet (slogdet)": run(lambda a, b: coding_length(a, b, lamda, order=None)),
        "Taylor order 4 (ours)": run(lambda a, b: coding_length(a, b, lamda, order=4)),
        "Taylor order 4 (official series)": run(lambda a, b: power_series(a, b, lamda, 4)),
    }


def end_to_end(arch: str, image_size: int, device: str, tiny: bool) -> dict[str, float]:
    import mec_hub
    import training.pretrain as pretrain

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        rng = np.random.default_rng(0)
        from PIL import Image

        count = 16 if tiny else 512
        for i in range(count):
            folder = data / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((image_size, image_size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        out = Path(tmp) / "run"
        batch, steps = (8, 2) if tiny else (128, 16)
        args = [
            "--data", str(data), "--output-dir", str(out), "--arch", arch, "--image-size", str(image_size),
            "--batch-size", str(batch), "--epochs", "4", "--warmup-epochs", "1", "--lamda-warmup-epochs", "1",
            "--max-steps", str(steps), "--log-every", "4", "--num-workers", "0" if tiny else "4", "--device", device,
            "--precision", "bf16", "--channels-last", "--no-tensorboard",
            # The paper's eps^2 at batch 128 (lamda 1/4); the tiny batch of 8 needs the scaled one (lamda >= 0.5 stops).
            "--eps2", "scaled" if tiny else "64",
        ]  # fmt: skip
        start = time.perf_counter()
        code = pretrain.main(args)
        seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"pretrain.py failed with exit code {code}")
        records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
        model = mec_hub.load(weights=out / "export", device=device)
        with torch.no_grad():
            features = model(torch.randn(2, 3, image_size, image_size, device=device))
        assert features.shape == (2, model.embed_dim) and bool(torch.isfinite(features).all())
        return {
            "steps": records[-1]["step"],
            "last images/s": records[-1]["images_per_s"],
            "loss": records[-1]["loss"],
            "wall s": seconds,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, toy sizes: check that nothing crashes")
    parser.add_argument("--results", type=Path, default=None, help="append a Markdown section to this file")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else PAPER
    if args.tiny:
        device = torch.device("cpu")
        name = f"CPU ({torch.get_num_threads()} threads), tiny sizes"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible to torch; use --tiny for a CPU crash test")
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True  # as training/pretrain.py sets it
    repeats = args.repeats or (3 if args.tiny else 10)
    started = time.perf_counter()
    rows: list[tuple[str, str]] = []
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    losses = loss_times(sizes["m"], sizes["d"], device, repeats)
    for label, seconds in losses.items():
        rows.append((f"loss fwd+bwd, m={sizes['m']} d={sizes['d']} fp32: {label}", f"{seconds * 1e3:.2f} ms"))
    exact, ours = losses["exact logdet (slogdet)"], losses["Taylor order 4 (ours)"]
    rows.append(("exact logdet / Taylor (ours) time", f"{exact / ours:.2f}x"))
    print("\n".join(f"{k}: {v}" for k, v in rows), flush=True)

    steps = {}
    for label, precision, channels_last in (("fp32", "fp32", False), ("bf16 + channels-last", "bf16", True)):
        result = measure(
            sizes["arch"],
            sizes["image"],
            sizes["batch"],
            2048 if not args.tiny else 64,
            device=str(device),
            precision=precision,
            channels_last=channels_last,
            repeats=repeats,
            compare_official=False,
        )
        steps[label] = result
        outside = result["loss"] + result["ema"] + result["schedules"] + result["norm_estimate"] / 50
        prefix = f"{sizes['arch']} MEC step, batch {sizes['batch']}, {sizes['image']} px, {label}"
        rows.append((f"{prefix}: images/s", f"{result['images_per_s']:.1f}"))
        rows.append((f"{prefix}: loss + EMA + schedules share of the step", f"{100 * outside / result['step']:.2f}%"))
        print("\n".join(f"{k}: {v}" for k, v in rows[-2:]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    speedup = steps["bf16 + channels-last"]["images_per_s"] / steps["fp32"]["images_per_s"]
    rows.append(("bf16 + channels-last / fp32 images/s", f"{speedup:.2f}x"))

    e2e = end_to_end(sizes["e2e_arch"], sizes["e2e_image"], str(device), args.tiny)
    rows.append(
        (
            f"pretrain.py end to end ({sizes['e2e_arch']}, {sizes['e2e_image']} px, bf16, channels-last)",
            f"{e2e['steps']} steps in {e2e['wall s']:.0f} s, last window {e2e['last images/s']:.0f} images/s, "
            f"loss {e2e['loss']:.4f}; export reloaded",
        )
    )
    total = time.perf_counter() - started
    print("\n".join(f"{k}: {v}" for k, v in rows[-2:]), f"\ntotal {total:.0f} s", flush=True)

    if args.results is not None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            "",
            f"## Training GPU check: {name} ({stamp})",
            "",
            f"`bash benchmarks/gpu_check.sh`; torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"median of {repeats} timed repeats after warm-up; {total:.0f} s in all.",
            "",
            "| measurement | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
        ]
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
