"""What one MEC training step spends outside the backbone: the loss, the teacher's EMA, the schedules.

Times a full ``training.engine.train_step`` (synthetic images, no data loading) and, at the same
sizes and in the same process, each part that is not backbone/heads work: the MEC loss forward
and backward (on embeddings of the step's shape), the EMA update of the teacher, and the
schedule look-up. The official code's versions (power-by-power series, a Python loop over
parameters for the EMA) are timed beside them for comparison.

    python benchmarks/step_overhead.py                       # resnet18, 64 px, batch 64, CPU
    python benchmarks/step_overhead.py --arch resnet50 --image-size 224 --batch-size 256 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loss_speed import power_series
from mec_hub.models.losses import MECLoss
from training.engine import Precision, train_step
from training.model import build_mec_model
from training.optim import build_optimizer
from training.schedules import Schedules


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (device-synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    arch: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 64,
    dim: int = 2048,
    pred_dim: int = 512,
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    repeats: int = 5,
    compare_official: bool = True,
) -> dict[str, float]:
    """Seconds per full step and per overhead part; ``images_per_s`` counts images (each gives two views)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_mec_model(arch, dim=dim, pred_dim=pred_dim).to(dev, memory_format=fmt)
    optimizer = build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=1e-5)
    # As training/pretrain.py sets it up: the norm estimate runs on logged steps only.
    criterion = MECLoss(power_iterations=10, warn_on_divergence=False, check_finite=False)
    schedules = Schedules(
        total_steps=100_000, lr=0.5, lr_warmup_steps=10_000, lamda_inv=batch_size * 64 / dim, lamda_warmup_steps=10_000
    )
    amp = Precision(precision, dev.type)
    scaler = amp.grad_scaler()
    views = tuple(torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=fmt) for _ in "12")
    step = [5_000]

    def full_step():
        values = schedules.at(step[0])
        train_step(model, model.update_teacher, criterion, optimizer, views, values, amp, scaler, estimate_norm=False)
        step[0] += 1

    out: dict[str, float] = {"step": timed(full_step, dev, repeats)}
    out["images_per_s"] = batch_size / out["step"]

    embeddings = [torch.randn(batch_size, dim, device=dev) for _ in range(4)]
    lamda_inv = batch_size * 64 / dim

    def loss_part():
        p1, p2 = (e.detach().requires_grad_() for e in embeddings[:2])
        criterion(p1, embeddings[2], p2, embeddings[3], lamda_inv=lamda_inv, estimate_norm=False).loss.backward()

    def norm_part():
        criterion(*embeddings, lamda_inv=lamda_inv)

    def loss_forward():
        criterion(*embeddings, lamda_inv=lamda_inv, estimate_norm=False)

    out["loss"] = timed(loss_part, dev, repeats)
    out["norm_estimate"] = max(timed(norm_part, dev, repeats) - timed(loss_forward, dev, repeats), 0.0)
    out["ema"] = timed(lambda: model.update_teacher(0.996), dev, repeats)

    def schedule_part():
        values = schedules.at(step[0])
        for group in optimizer.param_groups:
            group["lr"] = values.lr

    out["schedules"] = timed(schedule_part, dev, max(repeats, 100))
    if compare_official:

        def official_loss():
            p1, p2 = (e.detach().requires_grad_() for e in embeddings[:2])
            loss = power_series(embeddings[2], p2, 1 / lamda_inv) + power_series(embeddings[3], p1, 1 / lamda_inv)
            loss.backward()

        @torch.no_grad()
        def official_ema():
            for q, k in zip(model.student.parameters(), model.teacher.parameters(), strict=True):
                k.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)

        out["official_loss"] = timed(official_loss, dev, repeats)
        out["official_ema"] = timed(official_ema, dev, repeats)
    return out


def report(result: dict[str, float], log_every: int = 50) -> str:
    step = result["step"]
    result = {**result, "norm/log": result["norm_estimate"] / log_every}
    parts = ("loss", "ema", "schedules", "norm/log")
    overhead = sum(result[p] for p in parts)
    lines = [
        f"full step {step * 1e3:.1f} ms ({result['images_per_s']:.1f} images/s); spectral-norm estimate "
        f"{result['norm_estimate'] * 1e3:.2f} ms on logged steps, shown as norm/log amortised over {log_every} steps"
    ]
    for part in parts:
        line = f"  {part:<9} {result[part] * 1e3:8.3f} ms  {100 * result[part] / step:6.3f}% of the step"
        if f"official_{part}" in result:
            official = result[f"official_{part}"]
            line += f"   (official code: {official * 1e3:.3f} ms, {official / result[part]:.1f}x)"
        lines.append(line)
    lines.append(f"  overhead  {overhead * 1e3:8.3f} ms  {100 * overhead / step:6.3f}% of the step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50, help="steps per logged step (norm estimate)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.arch} {args.image_size}px, batch {args.batch_size}, dim {args.dim}, {args.device} {args.precision}"
        f"{' channels-last' if args.channels_last else ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    result = measure(
        args.arch,
        args.image_size,
        args.batch_size,
        args.dim,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        repeats=args.repeats,
    )
    print(report(result, args.log_every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
