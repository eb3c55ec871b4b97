"""Which runtime runs an ``Embedder``'s model: ``auto`` picks the fastest one this machine has.

Measured side by side on the same CPU (``benchmarks/runtime_speed.py``, ``benchmarks/RESULTS.md``),
ONNX Runtime runs an MEC ResNet-50 1.5-2.5x faster than PyTorch's eager path, even with BatchNorm
folded and channels-last; ``torch.compile`` gained less and took longer to compile than a whole
run of a few hundred images. So ``runtime="auto"`` (the default) runs the model through its cached
ONNX export (``mec_hub.export.onnx_cache``) when

* ``onnxruntime``, ``onnx`` and ``onnxscript`` are installed (the ``onnx`` extra),
* the device is a CPU, and the precision fp32 or int8 (ONNX Runtime's CPU provider is the one
  installed by ``pip install onnxruntime``; on GPUs PyTorch with autocast stays),
* the model is an MEC encoder as ``mec_hub.load`` makes it, run whole (no ``pool=``/``layer=``);

and through PyTorch otherwise. ``runtime="torch"`` or ``"onnxruntime"`` asks for one; the
environment variable ``MEC_HUB_RUNTIME`` (``auto``, ``torch`` or ``onnxruntime``) sets what ``auto``
means for every run on a machine. The runtime a run used is recorded in ``FEATS.meta.json``
(``runtime``, and ``onnx_export``: the cached file, its check against PyTorch, the versions).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from mec_hub.errors import InvalidArgumentError

if TYPE_CHECKING:  # torch is not imported here: mec-embed --help reads this module
    import torch

RUNTIMES = ("auto", "torch", "onnxruntime")
RUNTIME_ENV = "MEC_HUB_RUNTIME"
#: The packages the ONNX Runtime path needs: the runtime, and the exporter making its files.
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
#: Precisions ONNX Runtime runs here (int8 only there).
ONNX_PRECISIONS = ("fp32", "int8")


def onnx_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)


def requested_runtime(runtime: str) -> str:
    """``runtime`` as asked: ``auto`` becomes what ``MEC_HUB_RUNTIME`` says, when it is set."""
    if runtime not in RUNTIMES:
        raise InvalidArgumentError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "auto":
        value = os.environ.get(RUNTIME_ENV, "").strip().lower()
        if value and value not in RUNTIMES:
            raise InvalidArgumentError(
                f"the environment variable {RUNTIME_ENV}={value!r} names no runtime: {', '.join(RUNTIMES)}"
            )
        return value or "auto"
    return runtime


def choose_runtime(runtime: str, *, device: torch.device, precision: str, whole_encoder: bool) -> str:
    """``torch`` or ``onnxruntime`` for a model on ``device`` at ``precision`` (see the module docstring);
    ``whole_encoder``: the model is an MEC encoder run whole, which the export reproduces."""
    wanted = requested_runtime(runtime)
    if wanted != "auto":
        return wanted
    fits = device.type == "cpu" and precision in ONNX_PRECISIONS and whole_encoder
    return "onnxruntime" if fits and onnx_installed() else "torch"


def auto_runtime_help() -> str:
    """One sentence for ``--help``: what ``auto`` runs on this machine (a few ``find_spec`` calls)."""
    wanted = os.environ.get(RUNTIME_ENV, "").strip().lower()
    if wanted in ("torch", "onnxruntime"):
        return f"Here {RUNTIME_ENV}={wanted} makes auto mean {wanted}."
    if onnx_installed():
        return (
            "Here: onnxruntime on a CPU (fp32, int8; through an ONNX export of the model made once, checked "
            "against PyTorch and cached), torch on GPUs and for --pool/--layer."
        )
    return "Here: torch (for 1.5-2.5x on CPUs, pip install 'mec-hub[onnx]': auto then runs ONNX Runtime)."
