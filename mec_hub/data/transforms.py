"""The evaluation transform a model's weights expect: as a callable (``get_transform``) and as
explicit rules another language can re-implement (``preprocessing_rule``), both from timm's own
``create_transform`` of the model's ``pretrained_cfg``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mec_hub.errors import MecHubError
from mec_hub.weights.config import ModelConfig, preprocessing_fields
from mec_hub.weights.registry import model_info

#: Version of ``preprocessing_rule``'s format (written into export sidecars).
PREPROCESSING_RULE_VERSION = 1


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
    return _timm_eval_transform(resolve_preprocessing(model_or_name))


def _timm_eval_transform(preprocessing: Mapping[str, Any]) -> Any:
    from timm.data import create_transform  # here: timm's import takes seconds; reading preprocessing needs none of it

    return create_transform(is_training=False, **preprocessing)


def preprocessing_rule(model_or_name: Any) -> dict[str, Any]:
    """What ``get_transform(model_or_name)`` does, step by step, as JSON-ready explicit fields.

    Read off the very transform timm builds (so it follows timm's rule: resize to
    ``floor(input_size / crop_pct)``, then crop ``input_size``), with the integer arithmetic that
    torchvision and timm apply spelled out, so that Pillow (whose resampling filters torchvision
    calls on PIL images) and a few lines of array code reproduce it:

    * ``resize``: ``mode`` ``"shorter_side"`` (the shorter side to ``shorter_side``, the longer to
      ``floor(shorter_side * longer / shorter)``; ``max_size`` caps the longer one, null: none),
      ``"keep_ratio"`` (``scale = min`` (``ratio "min"``) or ``max`` (``"max"``) of
      ``height / size[0]`` and ``width / size[1]``, then each side ``round_half_even(side / scale)``)
      or ``"exact"`` (to ``size``, aspect ratio not kept); ``interpolation`` in timm's (and Pillow's)
      names, ``pillow_filter`` the ``PIL.Image.Resampling`` member used.
    * ``crop``: ``mode "center"``: where the resized image is smaller than ``size`` ``[H, W]``, pad
      ``floor(d / 2)`` before and ``ceil(d / 2)`` after (``d`` the shortfall) with ``pad_fill``
      (RGB, 0-255); then cut ``size`` at ``top = round_half_even((height - H) / 2)``,
      ``left = round_half_even((width - W) / 2)``.
    * then ``to_float`` (float32, divided by 255), ``normalize`` (``(x - mean) / std`` per channel),
      ``channel_order`` RGB, ``layout`` CHW per image (NCHW for a batch).

    A step timm builds that this cannot describe is a ``MecHubError``.
    """
    from timm.data import transforms as timm_transforms
    from torchvision import transforms as tv

    preprocessing = resolve_preprocessing(model_or_name)
    steps = list(_timm_eval_transform(preprocessing).transforms)
    order = ("resize", "crop", "to_float", "normalize")
    rule: dict[str, Any] = {"version": PREPROCESSING_RULE_VERSION, "image": "RGB, 8 bits per channel"}
    for index, step in enumerate(steps):
        expected = order[index] if index < len(order) else None
        if expected == "resize" and isinstance(step, tv.Resize):
            rule["resize"] = _resize_rule(step)
        elif expected == "resize" and isinstance(step, timm_transforms.ResizeKeepRatio):
            if step.random_scale_prob or step.random_aspect_prob or step.longest not in (0.0, 1.0):
                raise MecHubError(f"cannot describe timm's {step!r} as a fixed rule")
            rule["resize"] = {
                "mode": "keep_ratio",
                "size": [int(n) for n in step.size],
                "ratio": "max" if step.longest == 1.0 else "min",
                "size_rounding": "half_even",
                **_interpolation(step.interpolation),
            }
        elif expected == "crop" and isinstance(step, tv.CenterCrop | timm_transforms.CenterCropOrPad):
            fill = getattr(step, "fill", 0)  # torchvision's CenterCrop pads with 0
            rule["crop"] = {
                "mode": "center",
                "size": [int(n) for n in step.size],
                "offset_rounding": "half_even",
                "pad_fill": [int(v) for v in fill] if isinstance(fill, list | tuple) else [int(fill)] * 3,
            }
        elif expected == "to_float" and isinstance(step, tv.ToTensor | timm_transforms.MaybeToTensor):
            rule["to_float"] = {"dtype": "float32", "divide_by": 255}
        elif expected == "normalize" and isinstance(step, tv.Normalize):
            mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
            if [float(v) for v in step.mean] != _f32(mean) or [float(v) for v in step.std] != _f32(std):
                raise MecHubError(f"timm's {step!r} is not the config's mean {mean} and std {std}")
            rule["normalize"] = {"mean": mean, "std": std, "rule": "(x - mean) / std per channel, in float32"}
        else:
            raise MecHubError(
                f"cannot describe timm's eval transform: step {index + 1} is {type(step).__name__}, "
                f"expected a {expected or 'last step'}"
            )
    if len(steps) != len(order):
        raise MecHubError(f"cannot describe timm's eval transform: {len(steps)} steps, expected {', '.join(order)}")
    rule.update(channel_order="RGB", layout="CHW per image, NCHW for a batch")
    return rule


def _f32(values: list[float]) -> list[float]:
    import numpy as np

    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def _interpolation(mode: Any) -> dict[str, str]:
    from torchvision.transforms.functional import pil_modes_mapping

    value = getattr(mode, "value", mode)
    if mode not in pil_modes_mapping:
        raise MecHubError(f"cannot describe the interpolation {value!r}: Pillow has no filter for it")
    import PIL.Image

    # On a PIL image torchvision and timm call Pillow's resize, whose filters always antialias.
    filter_name = PIL.Image.Resampling(pil_modes_mapping[mode]).name
    return {"interpolation": str(value), "pillow_filter": filter_name, "antialias": True}


def _resize_rule(step: Any) -> dict[str, Any]:
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    common = _interpolation(step.interpolation)
    if len(size) == 1:
        return {
            "mode": "shorter_side",
            "shorter_side": int(size[0]),
            "longer_side_rounding": "floor",
            "max_size": None if step.max_size is None else int(step.max_size),
            **common,
        }
    return {"mode": "exact", "size": [int(n) for n in size], **common}
