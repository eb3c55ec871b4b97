"""Several processes embedding one list: who does which rows, and meeting at the end.

Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment) each process
takes one contiguous slice of the image list. Slices start on batch boundaries, so every batch is
exactly the batch a single process would have formed: the rows come out the same. The processes
talk only through a ``torch.distributed`` group (gloo is enough: they exchange a few small
objects), which is created here unless the caller already made one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    import torch

# Ranks wait for the slowest one at the end; a long timeout keeps a big, uneven job from failing
# there (torchrun still stops every process if one of them dies).
BARRIER_TIMEOUT = datetime.timedelta(hours=72)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (a lone process is rank 0 of 1), for embedding and training.

    ``device``: the device the process computes on, once chosen (training's ``setup`` sets it;
    ``dist_env()`` leaves it ``None``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Rank and world size from ``torch.distributed`` if initialised, else from torchrun's variables."""
    try:

        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", 0))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            return DistEnv(dist.get_rank(), dist.get_world_size(), local, local_world)
    except ImportError:
        pass
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local = int(os.environ.get("LOCAL_RANK", 0))
    return DistEnv(rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def join_process_group(device: torch.device, *, timeout: datetime.timedelta) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1), join the default process group unless this process already has.

    NCCL when ``device`` is a GPU (bound to it, so NCCL sets up eagerly), gloo on CPUs. Returns
    whether the group was created here (the caller then destroys it when done).
    """

    if dist_env().world_size == 1 or dist.is_initialized():
        return False
    kwargs: dict[str, Any] = {"backend": "nccl" if device.type == "cuda" else "gloo", "timeout": timeout}
    try:
        dist.init_process_group(**kwargs, device_id=device if device.type == "cuda" else None)
    except TypeError:  # PyTorch < 2.3 has no device_id
        dist.init_process_group(**kwargs)
    return True


def batch_aligned_slice(num_items: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of the items of ``rank``: contiguous, whole batches, batch counts within one."""
    num_batches = -(-num_items // batch_size)
    first = num_batches * rank // world_size
    last = num_batches * (rank + 1) // world_size
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


class ProcessGroup:
    """The few collective steps the embedding job needs; a no-op for a single process."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self._created = False
        if env.world_size == 1:
            return

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self._created = True

    def all_gather(self, obj: Any) -> list[Any]:
        if self.env.world_size == 1:
            return [obj]

        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_from_main(self, obj: Any) -> Any:
        if self.env.world_size == 1:
            return obj

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.env.world_size > 1:

            dist.barrier()

    def close(self) -> None:
        if self._created:

            dist.destroy_process_group()
            self._created = False
