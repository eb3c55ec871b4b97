"""The evaluation transform a model's weights expect."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mec_hub.weights.config import ModelConfig, preprocessing_fields
from mec_hub.weights.registry import model_info


def resolve_preprocessing(model_or_name: Any) -> dict[str, Any]:
    """Preprocessing of an encoder, a registry name, a ``ModelConfig``, or a timm ``pretrained_cfg`` dict.

    The result holds timm's six keys (``input_size``, ``interpolation``, ``crop_pct``,
    ``crop_mode``, ``mean``, ``std``), missing ones at their defaults and in one form, so two
    results are equal exactly when they preprocess alike.
    """
    if isinstance(model_or_name, str):
        return model_info(model_or_name).config.preprocessing
    if isinstance(model_or_name, ModelConfig):
        return model_or_name.preprocessing
    if isinstance(model_or_name, Mapping):
        return preprocessing_fields(model_or_name)
    cfg = getattr(model_or_name, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        return preprocessing_fields(cfg)
    raise TypeError(f"cannot tell the preprocessing of {type(model_or_name).__name__}")


def get_transform(model_or_name: Any) -> Callable[[Any], Any]:
    """PIL RGB image -> normalised ``(3, H, W)`` float tensor, exactly as timm evaluates this model.

    Accepts what ``mec_hub.load`` returns, a registry name, a ``ModelConfig`` or a ``pretrained_cfg``.
    """
    from timm.data import create_transform  # here: timm's import takes seconds; reading preprocessing needs none of it

    return create_transform(is_training=False, **resolve_preprocessing(model_or_name))
