"""Forward + backward time of ``mec_hub.models.losses.coding_length`` vs the plain power series.

The baseline evaluates the series as the paper's formula reads (and as the official
``loss_func`` does): the m x m matrix C, then C^2, C^3, C^4 by successive products, the signed
sum, its trace. Both run side by side in this process, float32 on the CPU, on the same inputs
(two correlated views, as in training), and must agree (relative difference <= 1e-5).

    python benchmarks/loss_speed.py                 # the issue's sizes
    python benchmarks/loss_speed.py --sizes 256x512 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mec_hub.models.losses import coding_length

TARGETS = {(1024, 2048): 1.6, (1024, 512): 8.0}


def power_series(z1: torch.Tensor, z2: torch.Tensor, lamda: float, order: int = 4) -> torch.Tensor:
    """The straightforward evaluation: power by power on the m x m matrix, then the trace."""
    c = lamda * F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
    power, total = c, torch.zeros_like(c)
    for k in range(1, order + 1):
        if k > 1:
            power = power @ c
        total = total + power / k if k % 2 else total - power / k
    return torch.trace(total)


def time_forward_backward(fn, z1: torch.Tensor, z2: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    value = None
    for _ in range(repeats):
        a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
        start = time.perf_counter()
        value = fn(a, b)
        value.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024x2048", "1024x512"], help="m x d pairs")
    parser.add_argument("--eps2", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, order 4, forward+backward")
    print(f"{'m':>5} {'d':>5} {'series ms':>10} {'ours ms':>9} {'speed-up':>9} {'target':>7} {'rel diff':>9}")
    ok = True
    for size in args.sizes:
        m, d = (int(v) for v in size.lower().split("x"))
        lamda = d / (m * args.eps2)
        generator = torch.Generator().manual_seed(0)
        z1 = torch.randn(m, d, generator=generator)
        z2 = z1 + 0.5 * torch.randn(m, d, generator=generator)

        def ours(a, b, lamda=lamda):
            return coding_length(a, b, lamda, 4)

        def baseline(a, b, lamda=lamda):
            return power_series(a, b, lamda, 4)

        # Warm-up (allocator, thread pool), then alternate so that both see the same machine load.
        time_forward_backward(ours, z1, z2, 1)
        time_forward_backward(baseline, z1, z2, 1)
        base_times, our_times = [], []
        for _ in range(args.repeats):
            t, base_value = time_forward_backward(baseline, z1, z2, 1)
            base_times.append(t)
            t, our_value = time_forward_backward(ours, z1, z2, 1)
            our_times.append(t)
        t_base, t_ours = statistics.median(base_times), statistics.median(our_times)
        rel = abs(float(our_value) - float(base_value)) / abs(float(base_value))
        ratio = t_base / t_ours
        target = TARGETS.get((m, d))
        passed = (target is None or ratio >= target) and rel <= 1e-5
        ok &= passed
        print(
            f"{m:>5} {d:>5} {t_base * 1e3:>10.1f} {t_ours * 1e3:>9.1f} {ratio:>8.2f}x "
            f"{(f'{target}x' if target else '-'):>7} {rel:>9.1e} {'ok' if passed else 'MISSED'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
