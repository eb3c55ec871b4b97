"""Deployment exports: an ONNX or TorchScript file mapping normalised images to the embedding.

``export_model`` writes ``FILE`` (``.onnx`` or a TorchScript ``.pt``), which takes a float32
``(N, 3, H, W)`` batch, already resized, cropped and normalised as the weights expect, and returns
the ``(N, D)`` embedding of the chosen head; and ``FILE.json`` beside it: the model's
``config.json`` (``pretrained_cfg`` is the preprocessing, in timm's vocabulary) with an ``export``
section (format, head, D, input and output names, batch, opset, the file's SHA-256), so that any
runtime can reproduce the preprocessing and check the file.

* ONNX goes through ``torch.onnx.export(dynamo=True)``: the exporter PyTorch maintains (the
  TorchScript-based ``dynamo=False`` one still works in torch 2.14 but is deprecated); it needs
  ``onnxscript`` (the ``onnx`` extra). It writes opset 18 or newer (older opsets go through ONNX's
  version converter, which fails on ResNets' ReduceMean) into one file (no external data).
* TorchScript goes through ``torch.jit.trace`` of the plain backbone (and projector) modules,
  without ``MECEncoder``'s Python attributes, so ``torch.jit.load`` needs neither mec_hub nor
  timm. A traced convolutional network takes any batch size.

``OnnxRuntimeModel`` runs such an ONNX file with ONNX Runtime as a module ``mec_hub.Embedder``
drives like any other (``mec-embed --runtime onnxruntime --weights FILE.onnx``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mec_hub.errors import ChecksumMismatchError, InvalidArgumentError, MecHubError
from mec_hub.fileio import atomic_write, atomic_write_json
from mec_hub.weights.config import ModelConfig
from mec_hub.weights.integrity import sha256_file

FORMATS = ("onnx", "torchscript")
HEADS = ("backbone", "projector")
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
MIN_OPSET = 18
ONNX_EXTRA = "pip install 'mec-hub[onnx]'"


class MissingDependencyError(MecHubError):
    """An optional package (the ``onnx`` extra) is not installed."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``FILE`` -> ``FILE.json``, where the preprocessing and export details of ``FILE`` are written."""
    return Path(f"{os.fspath(path)}.json")


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{what} needs the Python package {module!r}: {ONNX_EXTRA}")


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote, and how closely the file reproduces the PyTorch model."""

    path: Path
    sidecar: Path
    format: str
    head: str
    embed_dim: int
    input_size: tuple[int, int, int]
    sha256: str
    max_rel_diff: float | None  # on a random batch; None when the runtime to check it is missing


def deployable(encoder: nn.Module) -> nn.Module:
    """The encoder's computation as plain modules (backbone, then projector): no Python attributes,
    so it traces and exports like any ``nn.Sequential``."""
    backbone, projector = encoder.backbone, getattr(encoder, "projector", None)
    return (nn.Sequential(backbone) if projector is None else nn.Sequential(backbone, projector)).eval()


def _export_onnx(module: nn.Module, example: torch.Tensor, out: Path, *, dynamic_batch: bool, opset: int) -> None:
    _require("onnxscript", "ONNX export")
    _require("onnx", "ONNX export")
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(out),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise MecHubError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _export_torchscript(module: nn.Module, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, example)
    traced.save(str(out))


def _max_rel_diff(reference: torch.Tensor, other: np.ndarray) -> float:
    ref = reference.detach().numpy().astype(np.float64)
    return float(np.abs(other.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def _check(fmt: str, path: Path, module: nn.Module, batch: torch.Tensor) -> float | None:
    """Max relative difference between the written file and ``module`` on ``batch``."""
    with torch.no_grad():
        reference = module(batch)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
            return _max_rel_diff(reference, torch.jit.load(str(path))(batch).numpy())
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _max_rel_diff(reference, session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0])


def export_model(
    weights: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    fmt: str,
    head: str = "backbone",
    dynamic_batch: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
    sha256: str | None = None,
) -> ExportResult:
    """Write ``out`` (``fmt`` ``"onnx"`` or ``"torchscript"``) and ``out.json`` for the model ``weights``
    names (any spec ``mec_hub.load`` takes: registry name, folder, file, ``hf-hub:...``, URL),
    verified as ``mec_hub.load`` verifies it.

    ``dynamic_batch``: the ONNX file takes any batch size (otherwise batch 1; a TorchScript file
    always takes any). ``opset``: the ONNX opset (default and minimum ``MIN_OPSET``).
    """
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {FORMATS}, not {fmt!r}")
    if head not in HEADS:
        raise InvalidArgumentError(f"head must be one of {HEADS}, not {head!r}")
    if opset is not None and fmt != "onnx":
        raise InvalidArgumentError("--opset is for ONNX exports only")
    opset = MIN_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or newer")
    out = Path(out)
    side = sidecar_path(out)
    existing = [p.name for p in (out, side) if p.exists()]
    if existing and not overwrite:
        raise MecHubError(f"{', '.join(existing)} already exist in {out.parent}; pass --overwrite to replace them")
    if not out.parent.is_dir():
        raise MecHubError(f"{out.parent} is not a folder")
    if fmt == "onnx":
        _require("onnxscript", "ONNX export")

    from mec_hub.models.loading import load

    encoder = load(weights=weights, head=head, **({"sha256": sha256} if sha256 else {}))
    module = deployable(encoder)
    config: ModelConfig = encoder.config
    c, h, w = (int(n) for n in config.input_size)
    size = (c, h, w)
    any_batch = dynamic_batch or fmt == "torchscript"  # a traced network takes any batch
    example = torch.zeros(2 if any_batch else 1, *size)  # a dynamic batch dimension needs an example above 1
    checked: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        """Export into ``tmp``, then check it against the PyTorch model before it is published."""
        if fmt == "onnx":
            _export_onnx(module, example, tmp, dynamic_batch=dynamic_batch, opset=opset)
        else:
            _export_torchscript(module, example, tmp)
        batch = torch.randn(3 if any_batch else 1, *size, generator=torch.Generator().manual_seed(0))
        checked.update(max_rel_diff=_check(fmt, tmp, module, batch), sha256=sha256_file(tmp))

    atomic_write(out, write)
    max_rel_diff, digest = checked["max_rel_diff"], checked["sha256"]

    from mec_hub import __version__

    description = config.to_json_dict()
    description["export"] = {
        "format": fmt,
        "file": out.name,
        "sha256": digest,
        "head": head,
        "embed_dim": int(encoder.embed_dim),
        "input": {"name": INPUT_NAME, "shape": ["N" if any_batch else 1, *size]},
        "output": {"name": OUTPUT_NAME, "shape": ["N" if any_batch else 1, int(encoder.embed_dim)]},
        "input_is": "float32 RGB, resized and cropped to input_size, scaled to [0, 1], normalised by mean and std",
        "opset": opset if fmt == "onnx" else None,
        "source_weights_sha256": encoder.weights_sha256,
        "max_rel_diff_vs_pytorch": max_rel_diff,
        "mec_hub_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(side, description)
    return ExportResult(out, side, fmt, head, int(encoder.embed_dim), size, digest, max_rel_diff)


# --------------------------------------------------------------------------- ONNX Runtime


def read_export_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``FILE.json`` written beside an exported ``FILE``."""
    side = sidecar_path(path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MecHubError(
            f"{side} not found: the preprocessing of an exported model is read from it (mec-hub export writes it)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MecHubError(f"{side}: unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("export"), dict):
        raise MecHubError(f"{side}: no 'export' section; write it with mec-hub export")
    return data


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
        export = description["export"]
        if export.get("format") != "onnx":
            raise MecHubError(f"{sidecar_path(path)} describes a {export.get('format')!r} export, not an ONNX file")
        self.config = ModelConfig.from_json_dict(description, origin=str(sidecar_path(path)))
        digest = sha256_file(path)
        if export.get("sha256") and export["sha256"] != digest:
            raise ChecksumMismatchError(str(path), export["sha256"], digest)  # recorded in FILE.json by the export
        _require("onnxruntime", "--runtime onnxruntime")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.path = path
        self.weights_sha256 = digest
        self.name = self.config.name
        self.head = str(export.get("head", "backbone"))
        self.embed_dim = int(export["embed_dim"])
        self.pretrained_cfg: dict[str, Any] = self.config.pretrained_cfg
        self.embedding_meta = {"runtime": self.runtime}

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.fixed_batch
        if step is None or len(array) == step:
            out = self._run(array)
        else:
            blocks = []
            for start in range(0, len(array), step):
                chunk = array[start : start + step]
                padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                blocks.append(self._run(padded)[: len(chunk)])
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
        raise InvalidArgumentError("runtime='onnxruntime' takes the exported .onnx file as weights=, and no model=")
    if sha256 is not None:
        raise InvalidArgumentError("sha256= is for weights files; an exported file is checked against its FILE.json")
    module = OnnxRuntimeModel(weights)
    if head != "backbone" and head != module.head:
        raise InvalidArgumentError(f"head={head!r}, but {weights} was exported with head {module.head!r}")
    return module, None, str(Path(weights).resolve())
