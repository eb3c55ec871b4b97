"""``Embedder``: images in, ``(N, D)`` NumPy features out, with the preprocessing the weights expect.

    >>> import mec_hub
    >>> embedder = mec_hub.Embedder("mec_resnet50", device="auto", precision="bf16")
    >>> feats = embedder.embed(["a.jpg", "b.png"])            # np.ndarray (2, 2048)
    >>> result = embedder.embed_folder("images/", "feats.npy")  # what `mec-embed` runs

The model runs under ``torch.inference_mode`` in channels-last layout, fed by DataLoader workers
that decode ahead of it (pinned memory and non-blocking copies on CUDA); ``precision="bf16"`` or
``"fp16"`` runs it under autocast. Features are taken in float32, L2-normalised on request, then
cast to ``out_dtype``.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mec_hub.data.featurefile import FeatureMeta
from mec_hub.data.images import ImageDecodeError
from mec_hub.data.transforms import get_transform, resolve_preprocessing
from mec_hub.embedding import DEFAULT_BATCH_SIZE
from mec_hub.embedding.job import EmbedResult, ProgressCallback, run_job
from mec_hub.embedding.loader import ImageSource
from mec_hub.embedding.optimize import fold_batchnorm
from mec_hub.embedding.runner import Batch, BatchRunner, device_settings
from mec_hub.embedding.runtimes import choose_runtime, requested_runtime
from mec_hub.errors import InvalidArgumentError, MecHubError
from mec_hub.export.int8_targets import CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES, Agreement
from mec_hub.export.onnx_cache import CachedModel, describe, onnx_export
from mec_hub.export.quantize import int8_export
from mec_hub.models import loading
from mec_hub.models.encoder import MECEncoder
from mec_hub.models.features import PooledStage
from mec_hub.models.head_names import HEADS
from mec_hub.models.onnx_runtime import onnx_embedding_model
from mec_hub.models.protocol import identity_of, state_dict_sha256
from mec_hub.runtime.devices import PRECISIONS, cpu_has_bf16, decoding_plan, default_num_workers, resolve_device
from mec_hub.weights.identity import ModelIdentity, weights_origin
from mec_hub.weights.registry import is_registered
from mec_hub.weights.sources import is_default_weights

OUT_DTYPES = {"float32": np.float32, "float16": np.float16}
#: ``precision=``: autocast ones (``PRECISIONS``), and int8 (ONNX Runtime on a CPU, ``mec_hub.export.quantize``).
EMBED_PRECISIONS = (*PRECISIONS, "int8")


class ModelMismatchError(MecHubError):
    """The model rebuilt from a meta file is not the one that made the features."""


class Embedder:
    """Turns images into ``(N, D)`` NumPy features with an MEC encoder.

    Args:
        model: a registry name (see ``mec_hub.list_models()``), any weights spec
            ``mec_hub.load`` accepts, or an ``nn.Module`` with a ``pretrained_cfg`` (what
            ``mec_hub.load`` returns; it is put in eval mode, and runs as a BatchNorm-folded copy
            or, when it has nothing to fold, is itself moved to ``device``, channels-last). ``None``:
            the package's default model, or the model ``weights`` holds.
        weights: where to load the weights from (a local ``.safetensors`` file, a converted folder,
            ``hf-hub:org/name[@rev]``, a URL); with ``model`` a name, relocates that model's files.
            ``None`` or ``"DEFAULT"``: the model's own published weights.
        head: ``"backbone"`` (pooled features) or ``"projector"`` (MEC projector output).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 needs CUDA), or ``"int8"``:
            ONNX Runtime's static quantization of the model, on a CPU, calibrated on (a sample of
            ``calibration_images`` of) the first images it embeds and refused unless it agrees with
            fp32 on them (``mec_hub.export.quantize``; the figures are in ``int8_agreement`` and
            the meta file).
        batch_size: images per forward pass.
        num_workers: decoding processes (``None``: a default for the device, 0: in this process).
        normalize: L2-normalise each feature vector.
        out_dtype: ``"float32"`` or ``"float16"`` for the returned / written features.
        optimize: run a copy of the model with each BatchNorm folded into the convolution before
            it (same outputs up to float rounding, faster; see ``mec_hub.embedding.optimize``).
        sha256: the SHA-256 you trust for the weights' ``model.safetensors`` (see ``mec_hub.load``).
        pool, layer, gem_p: embed backbone stage ``layer`` (timm's feature index; default the last)
            pooled by ``pool`` (``"avg"``, ``"gem"`` with exponent ``gem_p``, or ``"none"``: the
            flattened ``C x H x W`` map) instead of the model's own output (see
            ``mec_hub.models.features.PooledStage``).
        runtime: ``"auto"`` (ONNX Runtime through a cached, checked export of the model on a CPU
            where it is installed, else PyTorch; see ``mec_hub.embedding.runtimes``), ``"torch"``,
            or ``"onnxruntime"``; an ONNX file written by ``mec-hub export`` (``weights=FILE.onnx``)
            runs as it is (fp32, see ``mec_hub.models.onnx_runtime``).
        calibration_images: how many of the images int8 is calibrated on.
    """

    def __init__(
        self,
        model: str | nn.Module | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        head: str = "backbone",
        device: str | torch.device = "auto",
        precision: str = "fp32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int | None = None,
        normalize: bool = False,
        out_dtype: str = "float32",
        optimize: bool = True,
        sha256: str | None = None,
        pool: str | None = None,
        layer: int | None = None,
        gem_p: float = 3.0,
        runtime: str = "auto",
        calibration_images: int = CALIBRATION_IMAGES,
    ) -> None:
        if precision not in EMBED_PRECISIONS:
            raise ValueError(f"precision must be one of {list(EMBED_PRECISIONS)}, not {precision!r}")
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {sorted(OUT_DTYPES)}, not {out_dtype!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        if not _is_whole_number(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number, at least 1, not {batch_size!r}")
        if num_workers is not None and (not _is_whole_number(num_workers) or num_workers < 0):
            raise ValueError(f"num_workers must be a whole number, 0 or more, not {num_workers!r}")
        if not _is_whole_number(calibration_images) or calibration_images < MIN_CALIBRATION_IMAGES:
            least = MIN_CALIBRATION_IMAGES
            raise ValueError(f"calibration_images must be a whole number, at least {least}, not {calibration_images!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise MecHubError(
                "fp16 autocast needs a CUDA device; CPU kernels for float16 are missing or slow. "
                "On CPU use precision='bf16' (or fp32).",
                arguments=("precision",),
            )
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise MecHubError(f"this GPU ({torch.cuda.get_device_name(self.device)}) has no bf16 support; use fp16")
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn(
                "this CPU has no bf16 instructions: bf16 is emulated here and runs several times slower "
                "than fp32 (the results are fine)",
                stacklevel=2,
            )
        self.precision = precision
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers(self.device) if num_workers is None else int(num_workers)
        self.decode_threads, self.worker_niceness = decoding_plan(self.device)
        self.normalize = bool(normalize)
        self.out_dtype = out_dtype
        wanted = requested_runtime(runtime)
        pooled = pool is not None or layer is not None
        if _names_onnx_file(model, weights):  # an exported file runs as it is
            if wanted == "torch" or pooled or precision != "fp32":
                raise InvalidArgumentError(
                    "an .onnx file runs with runtime='onnxruntime' as it was exported: fp32, no pool= or layer=",
                    arguments=("runtime", "precision"),
                )
            wanted = "onnxruntime"
            self.model, self.name, self.weights = onnx_embedding_model(model, weights, head=head, sha256=sha256)
        else:
            self.model, self.name, self.weights = self._load(model, weights, head, sha256)
        if pool is not None or layer is not None:
            self.model = PooledStage(self.model, layer=layer, pool=pool or "avg", gem_p=gem_p)
        self.head = str(getattr(self.model, "head", head))
        cfg = getattr(self.model, "pretrained_cfg", None)
        if not isinstance(cfg, Mapping):
            raise TypeError(
                f"{type(self.model).__name__} has no pretrained_cfg (its preprocessing); load it with "
                "mec_hub.load, or set module.pretrained_cfg = {'input_size': ..., 'mean': ..., ...}"
            )
        self.pretrained_cfg: dict[str, Any] = copy.deepcopy(dict(cfg))
        self.input_size = tuple(resolve_preprocessing(self.pretrained_cfg)["input_size"])
        self.transform = get_transform(self.pretrained_cfg)
        self.weights_sha256: str | None = getattr(self.model, "weights_sha256", None)
        # Made once, from the model as loaded (before it is folded or moved), and passed on.
        identity = getattr(self.model, "identity", None)
        if not isinstance(identity, ModelIdentity):  # a user's own module
            identity = identity_of(self.model, embed_dim=self._probe_embed_dim(self.model))
        self.identity: ModelIdentity = identity.replace(model=self.name, weights=self.weights, head=self.head)
        self.embed_dim = self.identity.embed_dim
        self.requested_runtime = wanted
        self.calibration_images = int(calibration_images)
        self._onnx: CachedModel | None = None  # the cached export that runs (runtime onnxruntime)
        self._int8: tuple[CachedModel, Agreement] | None = None  # once calibrated
        self.runtime = self._choose_runtime(wanted, whole_encoder=isinstance(self.model, MECEncoder))
        self._prepare_model(optimize)

    # -- model ------------------------------------------------------------------------------

    @staticmethod
    def _load(
        model: str | nn.Module | None, weights: str | os.PathLike[str] | None, head: str, sha256: str | None = None
    ) -> tuple[nn.Module, str | None, str | None]:
        """(module, registry name or None, loadable weights string or None)."""
        if isinstance(model, nn.Module):
            if weights is not None or sha256 is not None:
                raise ValueError("weights= and sha256= cannot be combined with an already loaded model")
            own_head = getattr(model, "head", None)
            if own_head is not None and head != "backbone" and head != own_head:
                raise ValueError(f"head={head!r}, but the given model's head is {own_head!r}")
            name = getattr(model, "name", None)
            return model, (name if isinstance(name, str) and is_registered(name) else None), None
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a registry name or an nn.Module, not {type(model).__name__}")
        if model is not None and weights is None and not is_registered(model):
            model, weights = None, model  # a weights spec given as the model: a path, hf-hub:..., a URL
        if weights is not None and is_default_weights(weights):
            weights = None  # "DEFAULT": the model's own published weights, as when none are given
        if model is None and weights is None:
            model = loading.DEFAULT_MODEL  # read when called: the loader's default, wherever it is set
        name_from_weights, weights_text = weights_origin(weights)
        module = loading.load(model, weights=weights, head=head, device="cpu", sha256=sha256)
        return module, model or name_from_weights, weights_text

    def _choose_runtime(self, wanted: str, *, whole_encoder: bool) -> str:
        """``torch`` or ``onnxruntime`` (``mec_hub.embedding.runtimes``); int8 needs the latter."""
        if getattr(self.model, "runtime", None) == "onnxruntime":  # an exported file
            return "onnxruntime"
        chosen = choose_runtime(wanted, device=self.device, precision=self.precision, whole_encoder=whole_encoder)
        if chosen == "onnxruntime" and not whole_encoder:
            raise InvalidArgumentError(
                "runtime='onnxruntime' runs an MEC encoder as mec_hub.load makes it, whole (no pool= or layer=), "
                "or an exported .onnx file",
                arguments=("runtime",),
            )
        if chosen == "onnxruntime" and self.device.type != "cpu":
            raise InvalidArgumentError(
                f"runtime='onnxruntime' runs on the CPU here, not {self.device}", arguments=("runtime", "device")
            )
        if self.precision == "int8" and chosen != "onnxruntime":
            raise InvalidArgumentError(
                "precision='int8' runs the model quantized by ONNX Runtime, on a CPU, whole (no pool= or layer=): "
                "pip install 'mec-hub[onnx]', device='cpu', and not runtime='torch'",
                arguments=("precision",),
            )
        return chosen

    def _prepare_model(self, optimize: bool) -> None:
        """The module that runs: the model's cached ONNX export, or the model (or its BatchNorm-folded
        copy) on the device, channels-last."""
        self.model.eval()
        self.optimizations: list[str] = []
        if self.runtime == "onnxruntime" and isinstance(self.model, MECEncoder):
            try:
                self._onnx = onnx_export(self.model)
            except MecHubError as exc:
                if self.requested_runtime != "auto" or self.precision == "int8":
                    raise
                warnings.warn(f"ONNX Runtime is not used, PyTorch runs the model: {exc}", stacklevel=3)
                self.runtime = "torch"
            else:
                self._runner, self.channels_last = self._onnx.model, False
                self.identity = self.identity.replace(runtime="onnxruntime")
                return
        folded = 0
        if optimize and self.runtime == "torch":
            self._runner, folded = fold_batchnorm(self.model)
        else:
            self._runner = self.model
        self.optimizations = ["fold_batchnorm"] if folded else []
        self._runner.to(self.device)
        self.channels_last = any(p.dim() == 4 for p in self._runner.parameters())
        if self.channels_last:
            self._runner.to(memory_format=torch.channels_last)

    def _probe_embed_dim(self, model: nn.Module) -> int | None:
        """The dimension a model without ``embed_dim`` outputs, from one forward pass of zeros."""
        if isinstance(getattr(model, "embed_dim", None), int):
            return None
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        model.eval()
        with torch.inference_mode():
            probe = model(torch.zeros(1, *self.input_size, device=device))
        if probe.dim() != 2:
            raise MecHubError(f"the model returned shape {tuple(probe.shape)}; expected (N, D) features")
        return int(probe.shape[1])

    def record(self) -> dict[str, Any]:
        """The model and embedding fields of FEATS.meta.json: the identity, then how it was run
        (with the cached export that ran, and int8's calibration and agreement with fp32)."""
        record = {
            **self.identity.to_json(),
            "normalize": self.normalize,
            "precision": self.precision,
            "out_dtype": self.out_dtype,
            "optimizations": self.optimizations,
        }
        if self._onnx is not None:
            record["onnx_export"] = describe(self._onnx)
        if self._int8 is not None:
            entry, agreement = self._int8
            record["int8"] = {
                "calibration_sha256": entry.record.get("calibration_sha256"),
                "calibration_images": agreement.images,
                "agreement_with_fp32": agreement.to_json(),
                **describe(entry),
            }
        return record

    @property
    def int8_agreement(self) -> Agreement | None:
        """With ``precision="int8"``, once calibrated: how the int8 vectors compare with fp32's."""
        return None if self._int8 is None else self._int8[1]

    def prepare(self, source: ImageSource) -> None:
        """What must happen before the first batch: int8's calibration, on up to ``calibration_images``
        of ``source``'s images spread evenly over it (the same ones for the same inputs, so a resumed
        run finds its model in the cache). Called by ``embed_folder`` and ``embed``; nothing to do
        for other precisions, or once calibrated."""
        if self.precision != "int8" or self._int8 is not None:
            return
        count = len(source)
        starts = np.unique(np.linspace(0, count, min(count, self.calibration_images), endpoint=False).astype(int))
        images: list[torch.Tensor] = []
        for start, stop in zip(starts, [*starts[1:], count], strict=True):
            for index in range(int(start), int(stop)):  # an image that fails to decode: the next one instead
                _, item = source[index]
                if isinstance(item, torch.Tensor):
                    images.append(item)
                    break
        self._calibrate(torch.stack(images).numpy() if images else np.empty((0, *self.input_size), np.float32))

    def _calibrate(self, images: np.ndarray) -> None:
        assert self._onnx is not None
        self._int8 = int8_export(self._onnx, images)
        self._runner = self._int8[0].model

    # -- forward ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = PRECISIONS.get(self.precision)  # int8: a quantized model, no autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(N, 3, H, W)`` images -> ``(N, D)`` float32 features on the device."""
        with torch.inference_mode(), self._autocast():
            x = images.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features = self._runner(x)
        if features.dim() != 2 or features.shape[0] != images.shape[0]:
            raise MecHubError(f"the model returned shape {tuple(features.shape)}; expected (N, D) features")
        with torch.inference_mode():
            features = features.float()
            if self.normalize:
                features = F.normalize(features, dim=1)
        return features

    def _to_numpy(self, features: torch.Tensor) -> np.ndarray:
        return features.cpu().numpy().astype(OUT_DTYPES[self.out_dtype], copy=False)

    def _finish(self, features: torch.Tensor | None) -> np.ndarray:
        if features is None:
            return np.empty((0, self.embed_dim), OUT_DTYPES[self.out_dtype])
        return self._to_numpy(features)

    def batches(
        self, source: ImageSource, start: int = 0, end: int | None = None, *, num_workers: int | None = None
    ) -> Iterator[Batch]:
        """Embed ``source[start:end]`` in order, yielding one ``Batch`` per batch (see ``runner.BatchRunner``).

        ``num_workers`` overrides this embedder's number of decoding processes for this call.
        """
        return BatchRunner(
            self._forward,
            self._finish,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers if num_workers is None else num_workers,
            input_size=self.input_size,
            decode_threads=self.decode_threads,
            worker_niceness=self.worker_niceness,
        ).batches(source, start, len(source) if end is None else end)

    # -- public API -------------------------------------------------------------------------

    def embed(self, items: Any) -> np.ndarray:
        """Features of ``items``: paths, PIL images (a list or a single one), or a preprocessed
        ``(N, 3, H, W)`` float tensor (float64 or float16 is cast to float32, what the model
        computes in). Returns ``np.ndarray`` ``(N, D)`` of ``out_dtype``.

        Files are decoded exactly as ``mec-embed`` decodes them (EXIF orientation, RGB
        conversion, pixel limit); one that cannot be read raises ``ImageDecodeError`` naming it,
        and so does a FIFO, socket or device, at once, without being read.
        """
        if isinstance(items, torch.Tensor):
            if self.precision == "int8" and self._int8 is None:
                self._calibrate(items[: self.calibration_images].float().numpy())
            return self._embed_tensor(items)
        if isinstance(items, str | os.PathLike | Image.Image):
            items = [items]
        items = list(items)
        if not items:
            return np.empty((0, self.embed_dim), OUT_DTYPES[self.out_dtype])
        bad = [type(x).__name__ for x in items if not isinstance(x, str | os.PathLike | Image.Image)]
        if bad:
            raise TypeError(f"items must be paths or PIL images (or one tensor batch), got {bad[0]}")
        sources = [x if isinstance(x, Image.Image) else os.fspath(x) for x in items]
        in_memory = any(isinstance(x, Image.Image) for x in sources)
        workers = 0 if in_memory or len(sources) <= self.batch_size else self.num_workers
        source = ImageSource(sources, self.transform)
        self.prepare(source)
        blocks = []
        for batch in self.batches(source, num_workers=workers):
            if batch.failures:
                index, reason = batch.failures[0]
                where = sources[index] if isinstance(sources[index], str) else f"image #{index}"
                more = f" (and {len(batch.failures) - 1} more in the same batch)" if len(batch.failures) > 1 else ""
                raise ImageDecodeError(reason + more, path=str(where))
            blocks.append(batch.features)
        return np.concatenate(blocks)

    def _embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"a tensor batch must be float (N, 3, H, W), already preprocessed; got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        images = images.float()  # float64 or float16 in: the model's float32 (autocast lowers it where asked)
        blocks = []
        with device_settings(self.device):
            for start in range(0, images.shape[0], self.batch_size):
                blocks.append(self._to_numpy(self._forward(images[start : start + self.batch_size])))
        if not blocks:
            return np.empty((0, self.embed_dim), OUT_DTYPES[self.out_dtype])
        return np.concatenate(blocks)

    def embed_folder(
        self,
        inputs: Any,
        out: str | os.PathLike[str],
        *,
        files_from: str | os.PathLike[str] | None = None,
        recursive: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool | None = None,
        on_commit: ProgressCallback | None = None,
        shard_rows: int | None = None,
    ) -> EmbedResult:
        """Embed every image named by ``inputs`` into ``out``: ``X.npy`` plus ``X.paths.txt`` and
        ``X.meta.json`` beside it, or ``X.parquet`` (in shards of ``shard_rows`` rows, if given);
        see ``mec_hub.embedding.job.run_job`` for the options.
        """
        return run_job(
            self,
            inputs,
            out,
            files_from=files_from,
            recursive=recursive,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            on_commit=on_commit,
            shard_rows=shard_rows,
        )

    @classmethod
    def from_meta(cls, meta: str | os.PathLike[str] | Mapping[str, Any] | FeatureMeta, **overrides: Any) -> Embedder:
        """An Embedder that embeds like the run that wrote ``meta`` (a FEATS.meta.json path, its
        ``FeatureMeta`` or the dict it holds).

        ``overrides`` replace constructor arguments (``device``, ``batch_size``, ``model`` for an
        already loaded module, ...). The rebuilt model must have the recorded weights digest,
        head, dimension and preprocessing, or ``ModelMismatchError`` says what differs. A meta that
        names no model (neither ``model`` nor ``weights``) is refused, unless ``overrides`` name one.
        """
        meta = _as_feature_meta(meta)
        named = meta.model or meta.weights or overrides.get("model") is not None or overrides.get("weights")
        if not named:
            raise InvalidArgumentError(
                "the metadata names no model (neither 'model' nor 'weights'), so the model that made the "
                "features is unknown; pass model= or weights="
            )
        kwargs: dict[str, Any] = {
            "model": meta.model,
            "weights": meta.weights,
            "head": "backbone" if meta.head is None else meta.head,
            "precision": "fp32" if meta.precision is None else meta.precision,
            "normalize": bool(meta.normalize),
            "out_dtype": "float32" if meta.out_dtype is None else meta.out_dtype,
        }
        if meta.batch_size:
            kwargs["batch_size"] = meta.batch_size
        if meta.optimizations is not None:
            kwargs["optimize"] = "fold_batchnorm" in meta.optimizations
        pooling = meta.extra.get("pooling")
        if isinstance(pooling, Mapping):
            kwargs.update(pool=pooling.get("pool"), layer=pooling.get("layer"), gem_p=pooling.get("gem_p", 3.0))
        # The runtime that made them (none recorded: torch); int8's calibration images are not at hand,
        # so int8 features get fp32 ONNX Runtime queries (what their recorded recall@10 compares with).
        kwargs["runtime"] = meta.extra.get("runtime") or "torch"
        if kwargs["precision"] == "int8":
            kwargs["precision"] = "fp32"
        if isinstance(overrides.get("model"), nn.Module):
            kwargs["weights"] = None
        kwargs.update(overrides)
        embedder = cls(**kwargs)
        embedder.check_matches(meta)
        return embedder

    def check_matches(self, meta: Mapping[str, Any] | FeatureMeta) -> None:
        """Raise ``ModelMismatchError`` unless this model is the one recorded in ``meta``."""
        meta = _as_feature_meta(meta)
        ours = self.identity
        if meta.state_dict_sha256 and not (meta.weights_sha256 and ours.weights_sha256) and not ours.state_dict_sha256:
            ours = ours.replace(state_dict_sha256=state_dict_sha256(self.model))
        # What the meta records is compared; what it leaves out (a file from another writer) is not.
        recorded = ours.replace(
            weights_sha256=meta.weights_sha256,
            state_dict_sha256=meta.state_dict_sha256,
            pooling=meta.extra.get("pooling"),
            runtime=meta.extra.get("runtime"),
            **{
                key: value
                for key in ("head", "embed_dim", "preprocessing")
                if (value := getattr(meta, key)) is not None
            },
        )
        problems = ours.differences(recorded)
        if problems:
            raise ModelMismatchError(
                "the model does not match the one that made these features: " + "; ".join(problems)
            )

    def __repr__(self) -> str:
        return (
            f"Embedder(model={self.name!r}, head={self.head!r}, embed_dim={self.embed_dim}, "
            f"device={str(self.device)!r}, runtime={self.runtime!r}, precision={self.precision!r}, "
            f"batch_size={self.batch_size}, normalize={self.normalize})"
        )


def embed(items: Any, model: str | nn.Module | None = None, **kwargs: Any) -> np.ndarray:
    """One line: ``mec_hub.embed(["a.jpg", "b.jpg"], "mec_resnet50")`` -> ``(2, D)`` features.

    ``kwargs`` are ``Embedder``'s (``weights``, ``device``, ``precision``, ``normalize``, ...).
    For many calls, build one ``Embedder`` and reuse it: each call here loads the model.
    """
    return Embedder(model, **kwargs).embed(items)


def _names_onnx_file(model: Any, weights: Any) -> bool:
    """Whether the weights spec (``weights``, or a path given as ``model``) is an exported ``.onnx`` file."""
    spec = weights if weights is not None else model if isinstance(model, str | os.PathLike) else None
    return spec is not None and os.fspath(spec).lower().endswith(".onnx")


def _is_whole_number(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_feature_meta(meta: str | os.PathLike[str] | Mapping[str, Any] | FeatureMeta) -> FeatureMeta:
    if isinstance(meta, FeatureMeta):
        return meta
    if isinstance(meta, Mapping):
        return FeatureMeta.from_json(meta)
    return FeatureMeta.load(meta)
