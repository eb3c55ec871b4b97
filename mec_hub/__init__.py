"""mec-hub: Maximum Entropy Coding (MEC) models, verified weights and fast feature extraction.

Importing the package is cheap (no torch); the functions below import their dependencies when
first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "list_models": "mec_hub.weights.registry",
    "model_info": "mec_hub.weights.registry",
    "ModelRecord": "mec_hub.weights.record",
    "ModelConfig": "mec_hub.weights.config",
    "load": "mec_hub.models.loading",
    "create_model": "mec_hub.models.loading",
    "get_transform": "mec_hub.data.transforms",
    "MECEncoder": "mec_hub.models.encoder",
    "MECLoss": "mec_hub.models.losses",
    "MECLossOutput": "mec_hub.models.losses",
    "coding_length": "mec_hub.models.losses",
    "spectral_norm_estimate": "mec_hub.models.losses",
    "build_projector": "mec_hub.models.heads",
    "build_predictor": "mec_hub.models.heads",
    "convert_checkpoint": "mec_hub.export.convert",
    "Embedder": "mec_hub.embedding.engine",
    "embed": "mec_hub.embedding.engine",
    "knn_classify": "mec_hub.evaluation.knn",
    "linear_probe": "mec_hub.evaluation.linear",
    "extract_image_folder": "mec_hub.evaluation.features",
    "FeatureIndex": "mec_hub.apps.index",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mec_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
