"""Process-group setup for ``torchrun`` (and the single-process case) and the few collectives a run needs.

The process's place in the job is ``mec_hub.runtime.distributed.DistEnv``, the type the embedding
job uses too; ``setup`` fills in its ``device``.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from mec_hub.runtime.distributed import DistEnv, dist_env, join_process_group
from training.config import ConfigError


def setup(device: str = "auto", *, timeout_minutes: float = 30.0) -> DistEnv:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the group.

    NCCL on GPUs, gloo on CPUs. ``device``: ``auto`` (a GPU when there is one), ``cuda`` or ``cpu``;
    a device this machine lacks is a :class:`ConfigError` (one line, before anything is read).
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device must be auto, cuda or cpu, not {device!r}")
    env = dist_env()
    local_rank = env.local_rank
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
        raise ConfigError(f"--device cuda, but torch ({build}) sees no GPU: use --device cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
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
