"""Which device runs the model, at which precision, and how many processes and threads decode for it."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from mec_hub.errors import MecHubError
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
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.name!r}")

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


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU of this process (``LOCAL_RANK`` under torchrun) if CUDA works, else CPU."""
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise MecHubError(f"device must be auto, cpu or cuda[:N], not {text!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise MecHubError(f"device {text!r} was asked for, but CUDA is not available here; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", dist_env().local_rank % torch.cuda.device_count())
        if resolved.index >= torch.cuda.device_count():
            raise MecHubError(f"device {text!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif resolved.type != "cpu":
        raise MecHubError(f"device must be auto, cpu or cuda[:N], not {text!r}")
    return resolved


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
