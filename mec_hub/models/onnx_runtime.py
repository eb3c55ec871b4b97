"""An exported ONNX file run by ONNX Runtime, as a module ``mec_hub.Embedder`` drives like any other
(``mec-embed --runtime onnxruntime --weights FILE.onnx``).

The file is what ``mec-hub export --format onnx`` writes (``mec_hub.export.deploy``); what it
computes and how to preprocess its input are read from ``FILE.json`` beside it
(``mec_hub.models.export_sidecar``). ``onnxruntime`` is the ``onnx`` extra: imported when a file
is opened, not with this module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mec_hub.errors import ChecksumMismatchError, InvalidArgumentError, MecHubError
from mec_hub.models.export_sidecar import INPUT_NAME, OUTPUT_NAME, read_export_description
from mec_hub.models.head_names import DEFAULT_HEAD
from mec_hub.weights.identity import ModelIdentity
from mec_hub.weights.integrity import sha256_file

ONNX_EXTRA = "pip install 'mec-hub[onnx]'"


class MissingDependencyError(MecHubError):
    """An optional package (the ``onnx`` extra) is not installed."""


def require(module: str, what: str, *, arguments: tuple[str, ...] = ()) -> None:
    """Raise ``MissingDependencyError`` when ``module`` (a package of the ``onnx`` extra) is missing;
    ``arguments``: the Python arguments ``what`` names (``MecHubError.arguments``)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{what} needs the Python package {module!r}: {ONNX_EXTRA}", arguments=arguments)


class OnnxRuntimeModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime, as a module: ``(N, 3, H, W)`` tensor in, ``(N, D)`` out.

    Reads ``FILE.json`` for the preprocessing (``pretrained_cfg``), head and dimension, and checks
    the file against the SHA-256 recorded there. ``weights_sha256`` is the ONNX file's own digest.
    A file exported with a fixed batch is fed in slices of that batch, the last one padded.
    ``threads``: ONNX Runtime's intra-op threads (default: PyTorch's, ``torch.get_num_threads()``).
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise MecHubError(f"ONNX file not found: {path}")
        description = read_export_description(path)
        if description.format != "onnx":
            raise MecHubError(f"{description.path} describes a {description.format!r} export, not an ONNX file")
        digest = sha256_file(path)
        if description.sha256 != digest:
            raise ChecksumMismatchError(str(path), description.sha256, digest)  # recorded in FILE.json by the export
        require("onnxruntime", "runtime='onnxruntime'", arguments=("runtime",))
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        # No busy-waiting between operators: mec-embed decodes the next batch on the same cores meanwhile
        # (end to end 0.70 -> 0.73 of the model alone, benchmarks/RESULTS.md; the model alone the same).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.path = path
        self.config = description.config
        self.weights_sha256 = digest
        self.name = self.config.name
        self.head = description.head
        self.embed_dim = description.embed_dim
        self.pretrained_cfg: dict[str, Any] = self.config.pretrained_cfg

    @property
    def identity(self) -> ModelIdentity:
        """What this model is (``mec_hub.weights.identity``): the exported file's digest stands for its weights."""
        return ModelIdentity(
            architecture=self.config.architecture,
            head=self.head,
            embed_dim=self.embed_dim,
            preprocessing=dict(self.pretrained_cfg),
            weights_sha256=self.weights_sha256,
            runtime=self.runtime,
        )

    def run(self, array: np.ndarray) -> np.ndarray:
        """A float32 ``(N, 3, H, W)`` array in, the ``(N, D)`` array out: the session, without torch."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.fixed_batch
        if step is None or len(array) == step:
            out = self.run(array)
        else:
            blocks = []
            for start in range(0, len(array), step):
                chunk = array[start : start + step]
                padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                blocks.append(self.run(padded)[: len(chunk)])
            out = np.concatenate(blocks) if blocks else np.empty((0, self.embed_dim), np.float32)
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, head={self.head!r}, embed_dim={self.embed_dim}"


def onnx_embedding_model(
    model: Any, weights: str | os.PathLike[str] | None, *, head: str, sha256: str | None
) -> tuple[OnnxRuntimeModel, None, str]:
    """What ``Embedder`` runs for ``runtime="onnxruntime"``: (module, no registry name, the file's path)."""
    if isinstance(model, str | os.PathLike) and weights is None:
        model, weights = None, model
    if model is not None or weights is None:
        raise InvalidArgumentError(
            "an exported .onnx file runs as it is: name it with weights=, and give no model=",
            arguments=("weights", "model"),
        )
    if sha256 is not None:
        raise InvalidArgumentError("sha256= is for weights files; an exported file is checked against its FILE.json")
    module = OnnxRuntimeModel(weights)
    if head != DEFAULT_HEAD and head != module.head:
        raise InvalidArgumentError(f"head={head!r}, but {weights} was exported with head {module.head!r}")
    return module, None, str(Path(weights).resolve())
