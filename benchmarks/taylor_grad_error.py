"""The order-4 series' relative error in the coding length's value and in its gradient, at set ||C||.

    python benchmarks/taylor_grad_error.py

Two (z, p) pairs of unit-row (m, d) = (256, 2048) embeddings, p = z + noise (row cosine about 0.8),
with z isotropic or anisotropic (singular values ~ i^-1/2, as trained embeddings are). lamda is set so
that the larger pair's ||C||_2 is 0.2, 0.4, 0.6, 0.8; k is lamda in units of d / (m * 64), the paper's
lamda (eps^2 = 64). The errors are those the fidelity monitor logs (``training.engine.taylor_fidelity``):
``|series - exact| / |exact|`` of the summed value and ``||g_series - g_exact||_F / ||g_exact||_F`` of the
gradient w.r.t. the p's. Float64, CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.engine import taylor_fidelity

M, D = 256, 2048


def pair(seed: int, anisotropic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, D, generator=g, dtype=torch.float64)
    if anisotropic:
        z = z * torch.arange(1, D + 1, dtype=torch.float64).rsqrt()
    z = F.normalize(z, dim=1)
    p = F.normalize(z + 0.75 * F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1), dim=1)
    return z, p


def main() -> None:
    print("| z | ||C||_2 | k | value error | gradient error | ratio | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for anisotropic in (False, True):
        pairs = [pair(1, anisotropic), pair(2, anisotropic)]
        top = max(float(torch.linalg.matrix_norm(z @ p.T, ord=2)) for z, p in pairs)
        for norm in (0.2, 0.4, 0.6, 0.8):
            lamda = norm / top
            started = time.perf_counter()
            f = taylor_fidelity(pairs, lamda, 4)
            seconds = time.perf_counter() - started
            value, grad = float(f.rel_error), float(f.grad_rel_error)
            kind = "anisotropic" if anisotropic else "isotropic"
            print(
                f"| {kind} | {float(f.spectral_norm):.2f} | {lamda / (D / (M * 64)):.2f} | {value:.2e} | {grad:.2e} "
                f"| {grad / value:.1f} | {seconds:.2f} |"
            )


if __name__ == "__main__":
    main()
