"""Evaluation: weighted kNN (DINO's protocol), a linear probe, the authors' linear protocol, fine-tuning.

Frozen features come from any model (``extract_image_folder``) or from ``.npy`` files
(``load_feature_file``). ``EvalSplits`` pairs train and val features with what made them,
``run_knn``/``run_linear`` evaluate them into an ``EvalReport`` (what ``mec-hub eval --out`` writes).
``run_linear_paper`` (the authors' main_lincls.py protocol) and ``run_finetune`` (semi-supervised
fine-tuning on a labelled subset) train on image folders (``mec_hub.evaluation.supervised``).
Importing this package is cheap; each name imports torch when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KnnResult": "mec_hub.evaluation.knn",
    "knn_classify": "mec_hub.evaluation.knn",
    "LinearProbeResult": "mec_hub.evaluation.linear",
    "linear_probe": "mec_hub.evaluation.linear",
    "LabelledFeatures": "mec_hub.evaluation.features",
    "extract_image_folder": "mec_hub.evaluation.features",
    "load_feature_file": "mec_hub.evaluation.features",
    "InvalidFeaturesError": "mec_hub.evaluation.inputs",
    "EvalSplits": "mec_hub.evaluation.splits",
    "load_eval_model": "mec_hub.evaluation.splits",
    "run_knn": "mec_hub.evaluation.protocols",
    "run_linear": "mec_hub.evaluation.protocols",
    "EvalReport": "mec_hub.evaluation.report",
    "run_linear_paper": "mec_hub.evaluation.supervised",
    "run_finetune": "mec_hub.evaluation.supervised",
    "PAPER_LINEAR": "mec_hub.evaluation.supervised",
    "SEMI_SUPERVISED": "mec_hub.evaluation.supervised",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mec_hub.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
