"""Which device runs the model, at which precision, and how many processes and threads decode for it."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from mec_hub.errors import InvalidArgumentError
from mec_hub.runtime.distributed import dist_env

# Autocast dtype of each precision (``None``: no autocast), for training and embedding alike.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Autocast settings: ``fp32`` (none), ``bf16``, or ``fp16`` (training scales its gradients)."""

    name: str
    device_type: str

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise InvalidArgumentError(
                f"precision= must be one of {', '.join(PRECISIONS)}, not {self.name!r}", arguments=("precision",)
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for ``fp16`` training (its small range underflows gradients), else ``None``."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: The one device grammar, for every command line (``--device``) and the Python API (``device=``).
DEVICE_GRAMMAR = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::(?P<index>[0-9]+))?")


class DeviceError(InvalidArgumentError):
    """A device outside :data:`DEVICE_GRAMMAR`, or one this machine lacks.

    ``reason`` follows the device's name (``'gpu' is not a device; ...``), so that each caller names
    it its own way: ``device='gpu' ...`` here, ``--device gpu ...`` on a command line.
    """

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"device={device!r} {reason}", arguments=("device",))
        self.device, self.reason = device, reason


def resolve_device(device: str | torch.device) -> torch.device:
    """The device ``device`` names, checked against this machine; :class:`DeviceError` otherwise.

    The grammar is ``auto | cpu | cuda | cuda:N | mps``, nothing else (no ``cpu:0``, no ``CUDA``).
    ``auto``: the GPU of this process if CUDA works (``LOCAL_RANK`` under torchrun), else CPU; it
    never picks MPS, which is used only when asked for. ``cuda``: likewise this process's GPU.
    """
    # A torch.device is taken as it is spelled, except the index of a cpu or mps device (always 0).
    text = device.type if isinstance(device, torch.device) and device.type != "cuda" else str(device)
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise DeviceError(text, f"is not a device; use {DEVICE_GRAMMAR}")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(text, "asks for MPS (Apple GPUs), which torch does not see here; use cpu or auto")
    if not text.startswith("cuda"):
        return torch.device(text)
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
        raise DeviceError(text, f"asks for CUDA, but torch ({build}) sees no GPU; use cpu or auto")
    count = torch.cuda.device_count()
    index = match["index"]
    if index is None:
        return torch.device("cuda", dist_env().local_rank % count)
    if int(index) >= count:
        raise DeviceError(text, f"does not exist: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", int(index))


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an op of torch's own oneDNN build; absent elsewhere
        return True


def _cpus_per_process() -> int:
    return max(1, available_cpus() // max(1, dist_env().local_world_size))


def default_num_workers(device: torch.device) -> int:
    """Decoding processes: one on CPU (threads inside it, see ``decoding_plan``), enough to feed a GPU."""
    if device.type == "cpu":
        return 1
    return max(1, min(8, _cpus_per_process() - 1))


def decoding_plan(device: torch.device) -> tuple[int, int]:
    """(decoding threads per worker, worker niceness) for a device.

    On CPU the model already keeps every core busy, and decoding is a few percent of the work.
    One worker at a lower priority, with a thread per core, decodes the next batch in the gaps
    the model leaves and takes the whole machine while the model waits, instead of preempting
    the model's threads (which stalls all of them at their next synchronisation point). Niceness
    10, not 19, so that a machine busy with other jobs slows decoding down but does not starve
    it. With a GPU the workers are what limits the speed: many of them, single-threaded, at
    normal priority.
    """
    if device.type == "cpu":
        return max(1, min(8, _cpus_per_process())), 10
    return 1, 0
