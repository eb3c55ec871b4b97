"""Process-group setup for ``torchrun`` (and the single-process case) and the few collectives a run needs.

The process's place in the job is ``mec_hub.runtime.distributed.DistEnv``, the type the embedding
job uses too; ``setup`` fills in its ``device``.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from mec_hub.runtime.devices import DeviceError, resolve_device
from mec_hub.runtime.distributed import DistEnv, dist_env, join_process_group
from training.config import ConfigError


def setup(device: str = "auto", *, timeout_minutes: float = 30.0) -> DistEnv:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the group.

    NCCL on GPUs, gloo otherwise. ``device``: the grammar of every command line (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``; ``mec_hub.runtime.devices.resolve_device``): ``auto`` and ``cuda``
    take this process's GPU (``LOCAL_RANK``). A malformed device, or one this machine lacks, is a
    :class:`ConfigError` naming ``--device`` (one line, exit 2, before anything is read).
    """
    env = dist_env()
    try:
        target = resolve_device(device)
    except DeviceError as exc:
        raise ConfigError(f"--device {exc.device} {exc.reason}") from None
    if target.type == "cuda" and env.world_size > 1 and device not in ("auto", "cuda"):
        raise ConfigError(
            f"--device {device} puts all {env.world_size} processes on one GPU; give --device cuda (or auto): "
            "each process takes the GPU of its LOCAL_RANK"
        )
    if target.type == "cuda":
        torch.cuda.set_device(target)
    join_process_group(target, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dataclasses.replace(env, device=target)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_agree(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is true on every rank."""
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is true on at least one rank."""
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
