"""int8 embedding: ONNX Runtime's static quantization of a cached export, calibrated on the user's images.

``int8_export(fp32, calibration)`` quantizes the fp32 ONNX file of ``mec_hub.export.onnx_cache``
with ``onnxruntime.quantization.quantize_static`` (the field's tool: QDQ format, weights int8 per
output channel, activations uint8 per tensor, ranges from the calibration images by min/max; the
graph is first optimised and shape-inferred by ``quant_pre_process``, which folds each BatchNorm into
its convolution so the folded weights are what is quantized). Static, not dynamic, quantization:
dynamic quantization leaves ONNX Runtime's convolutions in float, so a ResNet would gain nothing.

Before the int8 file is used, it and the fp32 file embed the calibration images and the two are
compared (``Agreement``): mean and minimum cosine similarity of each image's two vectors, and
recall@10 of a search of the int8 vectors against the fp32 ones (each image's 10 nearest fp32 rows,
itself left out, as found from its int8 vector, against those found from its fp32 vector). A model
that misses ``TARGETS`` is refused with the figures, and nothing is cached. An entry that passed is
cached like the fp32 export (``onnx_cache.cached_entry``), keyed by the fp32 entry, the digest of the
calibration tensor and the quantization settings, and records its figures. The targets, sample sizes
and ``Agreement`` live in the torch-free ``mec_hub.export.int8_targets``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.errors import MecHubError
from mec_hub.export.int8_targets import MIN_CALIBRATION_IMAGES, RECALL_K, Agreement
from mec_hub.export.onnx_cache import CACHE_FORMAT, MODEL_FILE, CachedModel, cached_entry, package_versions
from mec_hub.models.export_sidecar import INPUT_NAME, read_export_description, write_derived_description
from mec_hub.models.onnx_runtime import OnnxRuntimeModel
from mec_hub.weights.integrity import sha256_file

#: ``quantize_static``'s settings (recorded, and part of the cache key).
SETTINGS = {
    "method": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "weights": "int8, per channel",
    "activations": "uint8, per tensor",
    "calibration": "MinMax",
}
_CALIBRATION_BATCH = 16


class Int8RefusedError(MecHubError):
    """The int8 model does not agree with fp32 closely enough on the calibration images."""


def agreement(fp32: np.ndarray, int8: np.ndarray) -> Agreement:
    """Compare ``int8`` rows with the ``fp32`` rows of the same images (see the module docstring)."""
    a = fp32.astype(np.float64)
    b = int8.astype(np.float64)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(a * b, axis=1)
    n = len(a)
    k = min(RECALL_K, n - 1)
    recall = 1.0
    if k > 0:
        truth_scores, found_scores = a @ a.T, b @ a.T
        np.fill_diagonal(truth_scores, -np.inf)  # an image is not its own neighbour
        np.fill_diagonal(found_scores, -np.inf)
        truth = np.argsort(-truth_scores, axis=1, kind="stable")[:, :k]
        found = np.argsort(-found_scores, axis=1, kind="stable")[:, :k]
        recall = float(np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth, found, strict=True)]))
    return Agreement(n, float(cosine.mean()), float(cosine.min()), recall)


def calibration_sha256(images: np.ndarray) -> str:
    """Digest of a calibration tensor (shape, dtype, values)."""
    array = np.ascontiguousarray(images, dtype=np.float32)
    sha = hashlib.sha256(f"{array.shape}|{array.dtype}\n".encode())
    sha.update(array.tobytes())
    return sha.hexdigest()


def _embed(model: OnnxRuntimeModel, images: np.ndarray) -> np.ndarray:
    blocks = [model.run(images[i : i + _CALIBRATION_BATCH]) for i in range(0, len(images), _CALIBRATION_BATCH)]
    return np.concatenate(blocks)


def _quantize(fp32_path: Path, out: Path, images: np.ndarray) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), _CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {INPUT_NAME: images[start : start + _CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )


def int8_export(
    fp32: CachedModel, calibration: np.ndarray, *, cache_dir: Any = None, threads: int | None = None
) -> tuple[CachedModel, Agreement]:
    """The int8 model of the fp32 entry ``fp32``, calibrated on ``calibration`` (``(N, 3, H, W)`` float32
    images preprocessed for the model), and its agreement with fp32 on them; ``Int8RefusedError`` when
    it misses ``TARGETS``."""
    images = np.ascontiguousarray(calibration, dtype=np.float32)
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise MecHubError(
            f"int8 calibrates on the images it embeds and needs at least {MIN_CALIBRATION_IMAGES}; got {len(images)} "
            "(embed fewer images in fp32)",
            arguments=("precision",),
        )
    key = {
        "cache_format": CACHE_FORMAT,
        "kind": "onnx-int8",
        "fp32_entry": fp32.folder.name,
        "calibration_sha256": calibration_sha256(images),
        "calibration_images": len(images),
        "quantization": SETTINGS,
        "versions": package_versions(("onnxruntime", "onnx")),
    }

    def make(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        out = folder / MODEL_FILE
        _quantize(fp32.path, out, images)
        digest = sha256_file(out)
        write_derived_description(
            out,
            read_export_description(fp32.path),
            sha256=digest,
            changes={"precision": "int8", "quantization": SETTINGS, "fp32_sha256": fp32.record.get("onnx_sha256")},
        )
        found = agreement(_embed(fp32.model, images), _embed(OnnxRuntimeModel(out, threads=threads), images))
        misses = found.misses()
        if misses:
            raise Int8RefusedError(
                f"the int8 model is refused: {'; '.join(misses)} ({found.summary()}); embed in fp32",
                arguments=("precision",),
            )
        return {
            "onnx_sha256": digest,
            "quantization": SETTINGS,
            "agreement": found.to_json(),
            "quantize_seconds": round(time.perf_counter() - started, 2),
        }

    entry = cached_entry(key, make, what="int8 model", cache_dir=cache_dir, threads=threads)
    recorded = entry.record.get("agreement", {})
    try:
        found = Agreement(**recorded)
    except TypeError:
        raise MecHubError(f"{entry.folder}: its recorded agreement with fp32 is unreadable") from None
    return entry, found
