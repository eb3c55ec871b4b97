"""Deployment exports: an ONNX, torch.export or TorchScript file mapping normalised images to the embedding.

``export_model`` writes ``FILE`` (``.onnx``, a ``torch.export`` program ``.pt2`` or a TorchScript
``.pt``), which takes a float32
``(N, 3, H, W)`` batch, already resized, cropped and normalised as the weights expect, and returns
the ``(N, D)`` embedding of the chosen head; and ``FILE.json`` beside it: the model's
``config.json`` (``pretrained_cfg`` is the preprocessing, in timm's vocabulary) with an ``export``
section (format, head, D, input and output names, batch, opset, the file's SHA-256, and the
preprocessing as explicit steps: resize rule, crop, scaling, mean and std, channel order, layout),
so that any runtime can reproduce the preprocessing and check the file.

* ONNX goes through ``torch.onnx.export(dynamo=True)``: the exporter PyTorch maintains (the
  TorchScript-based ``dynamo=False`` one still works in torch 2.14 but is deprecated); it needs
  ``onnxscript`` (the ``onnx`` extra). It writes opset 18 or newer (older opsets go through ONNX's
  version converter, which fails on ResNets' ReduceMean) into one file (no external data).
* ``pt2`` goes through ``torch.export.export`` of the plain backbone (and projector) modules,
  with a dynamic batch dimension (``torch.export.Dim``), saved by ``torch.export.save``:
  ``torch.export.load(FILE).module()`` runs it without mec_hub or timm. The format PyTorch
  maintains for deployment (AOTInductor, ExecuTorch start from such a program).
* TorchScript (deprecated by PyTorch; kept while torch ships ``torch.jit``, with a
  ``FutureWarning``) goes through ``torch.jit.trace`` of the same modules, so ``torch.jit.load``
  needs neither mec_hub nor timm. A traced convolutional network takes any batch size.

Before ``FILE`` is published, it is loaded back and run on random batches (sizes 1 and 3 where it
takes any batch): an output further than ``MAX_REL_DIFF`` from the PyTorch model's is an error, and
nothing is written.

``FILE.json``'s format has its one home in ``mec_hub.models.export_sidecar`` (written here, read
by the runtimes); ``mec_hub.models.onnx_runtime.OnnxRuntimeModel`` runs such an ONNX file with ONNX
Runtime as a module ``mec_hub.Embedder`` drives like any other (``mec-embed --runtime onnxruntime
--weights FILE.onnx``). Both stay importable from here for existing callers.
An output that may not or cannot be written is one ``OutputPathError`` (``mec_hub.export.outputs``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mec_hub import __version__
from mec_hub.data.transforms import preprocessing_rule
from mec_hub.errors import InvalidArgumentError, MecHubError
from mec_hub.export.outputs import check_output, output_path
from mec_hub.fileio import atomic_write
from mec_hub.models.export_sidecar import (
    EXPORT_FORMATS,
    INPUT_NAME,
    OUTPUT_NAME,
    read_export_description,
    sidecar_path,
    write_export_description,
)
from mec_hub.models.head_names import DEFAULT_HEAD, HEADS
from mec_hub.models.loading import load
from mec_hub.models.onnx_runtime import MissingDependencyError, OnnxRuntimeModel, onnx_embedding_model, require
from mec_hub.weights.config import ModelConfig
from mec_hub.weights.integrity import sha256_file

# Importable from here as before; their home is mec_hub.models (see the module's docstring).
__all__ = [
    "ExportResult",
    "MissingDependencyError",
    "OnnxRuntimeModel",
    "deployable",
    "export_encoder",
    "export_model",
    "onnx_embedding_model",
    "read_export_description",
    "sidecar_path",
]

MIN_OPSET = 18
#: Largest ``max|exported - pytorch| / max|pytorch|`` on the check batches before a file is published.
MAX_REL_DIFF = 1e-4
#: Batch sizes an export that takes any batch is checked on.
CHECK_BATCH_SIZES = (1, 3)
#: Formats whose file takes any batch size, whatever ``dynamic_batch`` says.
ANY_BATCH_FORMATS = ("pt2", "torchscript")
TORCHSCRIPT_DEPRECATED = (
    "TorchScript is deprecated by PyTorch: prefer --format pt2 (a torch.export program, loaded with "
    "torch.export.load(FILE).module()); torchscript stays while torch ships torch.jit"
)


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
    require("onnxscript", "ONNX export")
    require("onnx", "ONNX export")
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


def _export_pt2(module: nn.Module, example: torch.Tensor, out: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False
            )
    except Exception as exc:
        raise MecHubError(
            f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    with open(out, "wb") as fh:  # a file object: torch.export.save warns about a path not ending in .pt2
        torch.export.save(program, fh)


def _run_pt2(path: Path, batch: torch.Tensor) -> np.ndarray:
    with open(path, "rb") as fh:
        program = torch.export.load(fh)
    with torch.no_grad():
        return program.module()(batch).numpy()


def _max_rel_diff(reference: torch.Tensor, other: np.ndarray) -> float:
    ref = reference.detach().numpy().astype(np.float64)
    return float(np.abs(other.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def _check(fmt: str, path: Path, module: nn.Module, batches: list[torch.Tensor]) -> float | None:
    """Max relative difference between the written file and ``module`` over ``batches`` (None: no
    runtime to run the file here); more than ``MAX_REL_DIFF`` is a ``MecHubError``."""
    diffs = [_check_one(fmt, path, module, batch) for batch in batches]
    if None in diffs:
        return None
    worst = max(d for d in diffs if d is not None)
    if not worst <= MAX_REL_DIFF:  # NaN fails too
        raise MecHubError(
            f"the {fmt} export differs from the PyTorch model by {worst:.2e} (relative; at most "
            f"{MAX_REL_DIFF:g} allowed) on random batches; nothing was written"
        )
    return worst


def _check_one(fmt: str, path: Path, module: nn.Module, batch: torch.Tensor) -> float | None:
    with torch.no_grad():
        reference = module(batch)
    if fmt == "pt2":
        return _max_rel_diff(reference, _run_pt2(path, batch))
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
    head: str = DEFAULT_HEAD,
    dynamic_batch: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
    sha256: str | None = None,
) -> ExportResult:
    """Write ``out`` (``fmt`` ``"onnx"``, ``"pt2"`` or the deprecated ``"torchscript"``) and ``out.json``
    for the model ``weights`` names (any spec ``mec_hub.load`` takes: registry name, folder, file,
    ``hf-hub:...``, URL), verified as ``mec_hub.load`` verifies it.

    ``dynamic_batch``: the ONNX file takes any batch size (otherwise batch 1; a pt2 or TorchScript
    file always takes any). ``opset``: the ONNX opset (default and minimum ``MIN_OPSET``).
    """
    if fmt not in EXPORT_FORMATS:
        raise InvalidArgumentError(f"format must be one of {EXPORT_FORMATS}, not {fmt!r}")
    if head not in HEADS:
        raise InvalidArgumentError(f"head must be one of {HEADS}, not {head!r}")
    if opset is not None and fmt != "onnx":
        raise InvalidArgumentError("opset= is for ONNX exports only", arguments=("opset",))
    opset = MIN_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or newer")
    out = Path(out)
    for path in (out, sidecar_path(out)):  # before the work, not after it
        check_output(path, folder=False, overwrite=overwrite)
    if fmt == "onnx":
        require("onnxscript", "ONNX export")
    encoder = load(weights=weights, head=head, **({"sha256": sha256} if sha256 else {}))
    return export_encoder(encoder, out, fmt=fmt, dynamic_batch=dynamic_batch, opset=opset, overwrite=overwrite)


def export_encoder(
    encoder: nn.Module,
    out: str | os.PathLike[str],
    *,
    fmt: str,
    dynamic_batch: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """``export_model`` for an encoder already loaded (``mec_hub.load``'s ``MECEncoder``, its head as
    loaded): the same file, the same check against the PyTorch model, the same ``FILE.json``.
    ``mec_hub.export.onnx_cache`` makes the exports ``mec-embed`` runs through it."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidArgumentError(f"format must be one of {EXPORT_FORMATS}, not {fmt!r}")
    opset = MIN_OPSET if opset is None else int(opset)
    out = Path(out)
    side = sidecar_path(out)
    for path in (out, side):
        check_output(path, folder=False, overwrite=overwrite)
    module = deployable(encoder)
    config: ModelConfig = encoder.config
    c, h, w = (int(n) for n in config.input_size)
    size = (c, h, w)
    any_batch = dynamic_batch or fmt in ANY_BATCH_FORMATS
    example = torch.zeros(2 if any_batch else 1, *size)  # a dynamic batch dimension needs an example above 1
    preprocessing = preprocessing_rule(config)  # before the export: a transform it cannot describe stops it
    checked: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        """Export into ``tmp`` and check it against the PyTorch model; then write ``FILE.json``, before
        ``FILE`` is published, so that a failure leaves both files as they were."""
        if fmt == "onnx":
            _export_onnx(module, example, tmp, dynamic_batch=dynamic_batch, opset=opset)
        elif fmt == "pt2":
            _export_pt2(module, example, tmp)
        else:
            _export_torchscript(module, example, tmp)
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(n, *size, generator=generator) for n in (CHECK_BATCH_SIZES if any_batch else (1,))]
        checked.update(max_rel_diff=_check(fmt, tmp, module, batches), sha256=sha256_file(tmp))
        write_export_description(
            out,
            config,
            fmt=fmt,
            sha256=checked["sha256"],
            source=encoder.identity,
            input_size=size,
            any_batch=any_batch,
            opset=opset if fmt == "onnx" else None,
            max_rel_diff=checked["max_rel_diff"],
            versions={"mec_hub_version": __version__, "torch_version": torch.__version__},
            preprocessing=preprocessing,
        )

    with output_path(out, folder=False, overwrite=overwrite):  # one error naming FILE, whichever write fails
        check_output(side, folder=False, overwrite=overwrite)
        atomic_write(out, write)
    max_rel_diff, digest = checked["max_rel_diff"], checked["sha256"]
    if fmt == "torchscript":  # once written: a failed export stays one error line
        warnings.warn(TORCHSCRIPT_DEPRECATED, FutureWarning, stacklevel=2)
    return ExportResult(out, side, fmt, str(encoder.head), int(encoder.embed_dim), size, digest, max_rel_diff)
