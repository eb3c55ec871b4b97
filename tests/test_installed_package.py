"""The MEC loss ships in the installed package: ``from mec_hub import MECLoss, coding_length`` after a
non-editable install, from a folder that is not the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

# Run by the installed copy; every number it checks is computed here with plain torch.
CHECK = r"""
import sys

target = sys.argv[1]
import mec_hub

assert mec_hub.__file__.startswith(target), mec_hub.__file__
assert "torch" not in sys.modules, "import mec_hub imported torch"
from mec_hub import MECLoss, coding_length

assert sys.modules["mec_hub.models.losses"].__file__.startswith(target)
import torch

g = torch.Generator().manual_seed(0)
m, d, lamda = 6, 4, 0.3
z1 = torch.randn(m, d, dtype=torch.float64, generator=g)
z2 = z1 + 0.5 * torch.randn(m, d, dtype=torch.float64, generator=g)
a = z1 / z1.norm(dim=1, keepdim=True)
b = z2 / z2.norm(dim=1, keepdim=True)
c = lamda * a @ b.T
sign, logdet = torch.linalg.slogdet(torch.eye(m, dtype=torch.float64) + c)
assert sign > 0
exact = coding_length(z1, z2, lamda, order=None)
assert torch.allclose(exact, logdet, rtol=1e-12, atol=1e-12), (exact, logdet)
series = sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(c, k)) for k in range(1, 5))
taylor = coding_length(z1, z2, lamda, order=4)
assert torch.allclose(taylor, series, rtol=1e-12, atol=1e-12), (taylor, series)

p1, p2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
out = MECLoss(eps2=2.0, order=None)(p1, z1, p2, z2)  # lamda = d / (m eps2)
lam = d / (m * 2.0)


def logdet_of(x, y):
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    return torch.linalg.slogdet(torch.eye(m, dtype=torch.float64) + lam * x @ y.T)[1]


mec = (logdet_of(z2, p1) + logdet_of(z1, p2)) / 2 / m
assert torch.allclose(out.loss, -mec / lam, rtol=1e-12), (out.loss, -mec / lam)
assert torch.allclose(out.coding_length, mec.detach() * (m + d) / 2, rtol=1e-12)
out.loss.backward()
assert p1.grad is not None and torch.isfinite(p1.grad).all()
print("ok")
"""


def _site_packages() -> list[str]:
    """Where this interpreter finds torch and the other dependencies (``site-packages`` folders only)."""
    import torch

    found = [p for p in sys.path if Path(p).name == "site-packages"]
    found.append(str(Path(torch.__file__).resolve().parents[1]))
    return list(dict.fromkeys(found))


@pytest.mark.slow  # 4 s: pip builds and installs the wheel
def test_mec_loss_imports_from_a_non_editable_install_outside_the_repository(tmp_path):
    # Build from a copy of what the wheel is made of, so that nothing is written into the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "mec_hub", source / "mec_hub", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--disable-pip-version-check", "--target", str(target), str(source)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    hint = ""
    if "invalid command 'bdist_wheel'" in installed.stderr:
        hint = "\nthis environment's setuptools cannot build wheels offline: pip install -e '.[dev]' (setuptools>=70.1)"
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:] + hint
    assert (target / "mec_hub" / "models" / "losses.py").is_file()
    assert not (target / "training").exists()  # the recipe is not installed; the loss does not need it

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site processing, so neither the repository's editable install nor a .pth file can
    # supply mec_hub; the dependencies come from this interpreter's site-packages, after the install.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *_site_packages()])
    result = subprocess.run(
        [sys.executable, "-S", "-c", CHECK, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=elsewhere,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
