"""``EmbeddingModel``: what every runnable model of the package offers, whichever runtime runs it.

``MECEncoder`` (torch), ``PooledStage`` (a pooled backbone stage) and ``OnnxRuntimeModel`` (an
exported file run by ONNX Runtime) satisfy it, so ``mec_hub.Embedder`` runs any of them the same
way: preprocessed ``(N, 3, H, W)`` float images in, ``(N, D)`` features out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mec_hub.models.head_names import DEFAULT_HEAD
from mec_hub.weights.identity import ModelIdentity


@runtime_checkable
class EmbeddingModel(Protocol):
    """A model that embeds images (see the module docstring)."""

    pretrained_cfg: dict[str, Any]  # its preprocessing, in timm's vocabulary
    head: str  # what it outputs: one of mec_hub.models.head_names.HEADS
    embed_dim: int  # D

    @property
    def identity(self) -> ModelIdentity:
        """Which weights, output and preprocessing: what records of its features name."""
        ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 images, preprocessed as ``pretrained_cfg`` says -> ``(N, D)`` features."""
        ...


def state_dict_sha256(module: nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, dtypes, shapes, values): the identity of
    weights that were not read from a file with a digest."""
    sha = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        sha.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def identity_of(model: nn.Module, *, embed_dim: int | None = None) -> ModelIdentity:
    """The ``ModelIdentity`` of a model, made from what it carries: the one place one is made.

    The package's models (``MECEncoder``, ``PooledStage``, ``OnnxRuntimeModel``) answer their
    ``identity`` with it; any other module with a ``pretrained_cfg`` (a user's own network) gets one
    too: its class as the architecture, its tensors' digest as the weights' identity.
    ``embed_dim`` is for a module that does not say its dimension.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"{type(model).__name__} has no pretrained_cfg (its preprocessing); load it with "
            "mec_hub.load, or set module.pretrained_cfg = {'input_size': ..., 'mean': ..., ...}"
        )
    dim = getattr(model, "embed_dim", None)
    dim = dim if isinstance(dim, int) else embed_dim
    if not isinstance(dim, int):
        raise TypeError(f"{type(model).__name__} has no embed_dim; pass the dimension it outputs")
    config = getattr(model, "config", None)
    sha = getattr(model, "weights_sha256", None)
    return ModelIdentity(
        architecture=str(getattr(config, "architecture", type(model).__name__)),
        head=str(getattr(model, "head", DEFAULT_HEAD)),
        embed_dim=dim,
        preprocessing=dict(cfg),
        weights_sha256=sha,
        state_dict_sha256=None if sha else state_dict_sha256(model),
        pooling=getattr(model, "pooling", None),
        runtime=getattr(model, "runtime", None),
    )
