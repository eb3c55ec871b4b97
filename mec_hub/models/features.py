"""Dense and intermediate features: the stage feature maps of a loaded encoder, and one stage pooled.

``feature_model`` gives what ``timm.create_model(..., features_only=True)`` gives (timm's own
wrapper, ``feature_info`` with channels and reductions) holding the weights ``mec_hub.load``
verified and loaded: the wrapper is built by timm for the architecture, and each of its keys is
read from the backbone's weights under the name it had before timm wrapped it. So any
architecture timm can wrap works, ViTs included (timm wraps those with ``FeatureGetterNet``).

``PooledStage`` turns one stage into the ``(N, D)`` rows ``mec-embed --layer N --pool avg|gem|none``
writes: average pooling, generalized-mean pooling (GeM, Radenović et al., "Fine-tuning CNN image
retrieval with no human annotation", TPAMI 2018) or the flattened ``C x H x W`` map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mec_hub.errors import IncompatibleWeightsError, InvalidArgumentError
from mec_hub.models.encoder import MECEncoder, load_state_dict_strict, use_small_image_stem
from mec_hub.models.protocol import identity_of
from mec_hub.weights.identity import ModelIdentity

POOLS = ("avg", "gem", "none")
GEM_EPS = 1e-6  # GeM clamps the map at this value before the power, as in the paper's code


def stage_count(encoder: MECEncoder) -> int:
    """How many feature stages the backbone has (valid ``out_indices`` / ``--layer`` are 0 .. count-1)."""
    info = getattr(encoder.backbone, "feature_info", None)
    if not isinstance(info, Sequence) or not info:
        raise IncompatibleWeightsError(f"{encoder.config.architecture} lists no feature stages (no timm feature_info)")
    return len(info)


def _checked_indices(encoder: MECEncoder, out_indices: Sequence[int] | None) -> tuple[int, ...] | None:
    if out_indices is None:
        return None
    count = stage_count(encoder)
    indices = tuple(int(i) for i in out_indices)
    bad = [i for i in indices if not 0 <= i < count]
    if not indices or bad:
        raise InvalidArgumentError(
            f"out_indices {tuple(out_indices)}: {encoder.config.architecture} has feature stages 0 to {count - 1}"
        )
    return indices


def _source_key(key: str, source: Mapping[str, Any]) -> str | None:
    """The backbone key that timm's feature wrapper renamed to ``key``.

    timm's wrappers keep the model's own module names (``FeatureListNet``, ``FeatureDictNet``), put
    the whole model under ``model.`` (``FeatureGetterNet``), or flatten a top-level Sequential's
    children to ``parent_child`` (``flatten_sequential``).
    """
    candidates = [key]
    if key.startswith("model."):
        candidates.append(key[len("model.") :])
    head, dot, rest = key.partition(".")
    candidates += [f"{head[:i]}.{head[i + 1 :]}{dot}{rest}" for i, ch in enumerate(head) if ch == "_"]
    return next((c for c in candidates if c in source), None)


def _use_small_stem(model: nn.Module) -> None:
    """The small-image stem on a wrapped ResNet (which has no max-pool when only stage 0 is asked for)."""
    stem_only = not hasattr(model, "maxpool")
    if stem_only:
        model.maxpool = nn.Identity()
    use_small_image_stem(model)
    if stem_only:
        del model.maxpool


def _measure_reductions(model: nn.Module) -> None:
    """Set ``feature_info``'s reductions from the maps' sizes (timm's numbers assume its own stem)."""
    info = model.feature_info
    size = 2 * max(entry["reduction"] for entry in info.info)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    for index, fmap in zip(info.out_indices, maps, strict=True):
        info.info[index]["reduction"] = size // fmap.shape[-1]


def feature_model(encoder: MECEncoder, out_indices: Sequence[int] | None = None) -> nn.Module:
    """timm's ``features_only`` model of ``encoder``'s architecture, with ``encoder``'s backbone weights.

    Its forward returns a list of ``(N, C_i, H_i, W_i)`` maps, one per index of ``out_indices``
    (timm's numbering: for a ResNet 0 is the stem, 1-4 the four stages; ``None``: timm's default
    for the architecture); ``feature_info.channels()`` and ``.reduction()`` describe them. It
    carries the encoder's ``pretrained_cfg``, ``config`` and ``weights_sha256``. The weights are
    copied with a strict check: every tensor of the wrapper must come from the backbone.
    """
    if encoder.projector is not None:
        raise InvalidArgumentError("feature maps come from the backbone: use head='backbone' with features_only")
    config = encoder.config
    indices = _checked_indices(encoder, out_indices)
    kwargs: dict[str, Any] = dict(config.model_args)
    if indices is not None:
        kwargs["out_indices"] = indices
    try:
        model = timm.create_model(config.architecture, pretrained=False, features_only=True, **kwargs)
    except Exception as exc:  # timm raises RuntimeError, AssertionError, ... for models it cannot wrap
        raise IncompatibleWeightsError(f"timm has no features_only form of {config.architecture}: {exc}") from None
    if config.stem == "small":
        _use_small_stem(model)
    source = encoder.backbone.state_dict()
    mapped = {}
    for key in model.state_dict():
        origin = _source_key(key, source)
        if origin is not None:
            mapped[key] = source[origin]
    name = config.name or config.architecture
    load_state_dict_strict(model, mapped, origin=f"the {name} backbone", target=f"{config.architecture} feature model")
    if config.stem == "small":
        _measure_reductions(model)
    model.pretrained_cfg = dict(encoder.pretrained_cfg)
    model.config = config
    model.weights_sha256 = encoder.weights_sha256
    return model.eval()


class PooledStage(nn.Module):
    """Maps ``(N, 3, H, W)`` images to one stage's features, pooled to ``(N, C)`` or flattened.

    ``pool="avg"``: the mean over the map (on the last stage, the backbone's own pooled output);
    ``"gem"``: ``(mean(clamp(x, eps) ** p)) ** (1 / p)`` over the map (``p=1`` is the mean, large
    ``p`` tends to the maximum); ``"none"``: the ``C x H x W`` map flattened to ``(N, C*H*W)``
    (``map_shape`` gives ``(C, H, W)`` at the model's input size). Carries what ``mec_hub.Embedder``
    reads (``pretrained_cfg``, ``weights_sha256``, ``config``, ``head``, ``embed_dim``) and its
    ``identity``, whose ``pooling`` (the stage and pooling) the feature file's meta records.
    """

    def __init__(self, encoder: MECEncoder, *, layer: int | None = None, pool: str = "avg", gem_p: float = 3.0):
        super().__init__()
        if pool not in POOLS:
            raise InvalidArgumentError(f"pool must be one of {POOLS}, not {pool!r}")
        if pool == "gem" and not gem_p > 0:
            raise InvalidArgumentError(f"the GeM exponent must be positive, not {gem_p}")
        layer = stage_count(encoder) - 1 if layer is None else int(layer)
        self.features = feature_model(encoder, (layer,))
        self.layer, self.pool, self.gem_p = layer, pool, float(gem_p)
        self.config = encoder.config
        self.name = encoder.name
        self.head = "backbone"
        self.pretrained_cfg: dict[str, Any] = dict(encoder.pretrained_cfg)
        self.weights_sha256 = encoder.weights_sha256
        channels = self.features.feature_info.channels()[0]
        self.map_shape: tuple[int, int, int] | None = None
        if pool == "none":
            with torch.no_grad():
                fmap = self.features(torch.zeros(1, *self.config.input_size))[0]
            self.map_shape = (int(fmap.shape[1]), int(fmap.shape[2]), int(fmap.shape[3]))
        self.embed_dim = channels if self.map_shape is None else math.prod(self.map_shape)
        self.pooling: dict[str, Any] = {"layer": self.layer, "pool": self.pool}  # as the meta records it
        if self.pool == "gem":
            self.pooling["gem_p"] = self.gem_p
        if self.map_shape is not None:
            self.pooling["map_shape"] = list(self.map_shape)

    @property
    def identity(self) -> ModelIdentity:
        return identity_of(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.features(x)[0]
        if self.pool == "avg":
            return F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        if self.pool == "gem":
            return F.adaptive_avg_pool2d(fmap.clamp(min=GEM_EPS).pow(self.gem_p), 1).pow(1.0 / self.gem_p).flatten(1)
        return fmap.flatten(1)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, pool={self.pool!r}, embed_dim={self.embed_dim}"
