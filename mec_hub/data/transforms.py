"""The evaluation transform a model's weights expect."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mec_hub.weights.config import HubConfig
from mec_hub.weights.registry import Preprocessing, model_info


def resolve_preprocessing(model_or_name: Any) -> Preprocessing:
    """Preprocessing of an encoder, a registry name, a ``HubConfig``, or a timm ``pretrained_cfg`` dict."""
    if isinstance(model_or_name, Preprocessing):
        return model_or_name
    if isinstance(model_or_name, str):
        return model_info(model_or_name).preprocessing
    if isinstance(model_or_name, HubConfig):
        return model_or_name.preprocessing
    if isinstance(model_or_name, Mapping):
        return Preprocessing.from_pretrained_cfg(model_or_name)
    cfg = getattr(model_or_name, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        return Preprocessing.from_pretrained_cfg(cfg)
    raise TypeError(f"cannot tell the preprocessing of {type(model_or_name).__name__}")


def get_transform(model_or_name: Any) -> Callable[[Any], Any]:
    """PIL RGB image -> normalised ``(3, H, W)`` float tensor, exactly as timm evaluates this model.

    Accepts what ``mec_hub.load`` returns, a registry name, a ``HubConfig`` or a ``pretrained_cfg``.
    """
    from timm.data import create_transform

    pre = resolve_preprocessing(model_or_name)
    return create_transform(
        input_size=pre.input_size,
        is_training=False,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
    )
