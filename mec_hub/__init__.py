"""mec-hub: Maximum Entropy Coding (MEC) models, verified weights and fast feature extraction.

Importing the package is cheap (no torch); the functions below import their dependencies when
first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "list_models": "mec_hub.registry",
    "model_info": "mec_hub.registry",
    "ModelRecord": "mec_hub.registry",
    "load": "mec_hub.loading",
    "get_transform": "mec_hub.transforms",
    "MECEncoder": "mec_hub.modeling",
    "convert_checkpoint": "mec_hub.convert",
    "Embedder": "mec_hub.embedding.engine",
    "embed": "mec_hub.embedding.engine",
    "knn_classify": "mec_hub.evaluation.knn",
    "linear_probe": "mec_hub.evaluation.linear",
    "extract_image_folder": "mec_hub.evaluation.features",
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
