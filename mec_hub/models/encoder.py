"""The module ``mec_hub.load`` returns: a timm backbone, optionally followed by the projector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

from mec_hub.errors import IncompatibleWeightsError, InvalidArgumentError
from mec_hub.models.head_names import HEADS
from mec_hub.models.heads import build_projector
from mec_hub.models.protocol import identity_of
from mec_hub.weights.config import STEMS, ModelConfig
from mec_hub.weights.identity import ModelIdentity

# Most parameters a backbone may have (4 GB at fp32, twice timm's largest ResNet). Counted on the
# meta device before anything is allocated, so that a description asking for an absurd size is
# refused at once instead of running out of memory.
MAX_PARAMETERS = 1_000_000_000


def use_small_image_stem(backbone: nn.Module) -> nn.Module:
    """Swap a ResNet's 7x7/2 stem and max-pool for one 3x3/1 convolution (CIFAR-style, 32-64 px data).

    timm has no argument for this stem, so weights trained with it load through mec_hub (whose
    config records ``stem: small``) and not through plain timm.
    """
    conv1, maxpool = getattr(backbone, "conv1", None), getattr(backbone, "maxpool", None)
    if not isinstance(conv1, nn.Conv2d) or maxpool is None:
        raise IncompatibleWeightsError(
            f"the small-image stem needs a ResNet with a single-conv stem; {type(backbone).__name__} has none"
        )
    backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    return backbone


def _parameter_count(architecture: str, kwargs: Mapping[str, Any]) -> int | None:
    """Parameters and buffers of the model, built on the meta device (no memory); ``None`` when it
    cannot be built there (the real build then says why)."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    except Exception:
        return None
    return sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))


def build_backbone(architecture: str, model_args: Mapping[str, Any] | None = None, stem: str = "default") -> nn.Module:
    """A headless timm model whose forward returns pooled ``(N, num_features)`` features."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, not {stem!r}")
    kwargs = dict(model_args or {})
    size = _parameter_count(architecture, kwargs)
    if size is not None and size > MAX_PARAMETERS:
        raise IncompatibleWeightsError(
            f"architecture {architecture!r} with {kwargs} would have {size:,} parameters, more than "
            f"{MAX_PARAMETERS:,}: refused before allocating it"
        )
    try:
        backbone = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise IncompatibleWeightsError(f"cannot build architecture {architecture!r}: {exc}") from None
    return use_small_image_stem(backbone) if stem == "small" else backbone


class MECEncoder(nn.Module):
    """Maps ``(N, 3, H, W)`` float images to ``(N, D)`` embeddings.

    ``head="backbone"`` gives the pooled backbone features (what linear probes and kNN use);
    ``head="projector"`` appends the MEC projector, the space the MEC loss was computed in.
    The preprocessing the weights expect travels with the module as ``pretrained_cfg`` (timm
    vocabulary), so ``mec_hub.get_transform(model)`` needs nothing else.

    It answers to timm's model interface with timm's meanings, so code written for a timm
    backbone runs on it unchanged: ``num_features`` (the pooled width), ``forward_features``
    (the unpooled feature map), ``forward_head(x, pre_logits=False)`` (pooling, then the
    classifier), ``get_classifier``, ``reset_classifier(num_classes, global_pool=None)``,
    ``num_classes`` and ``default_cfg`` (``pretrained_cfg``). The MEC projector takes the
    classifier's place: it is what ``get_classifier()`` returns and what ``forward_head`` applies
    after pooling (``pre_logits=True`` stops before it), and ``reset_classifier`` replaces it as
    timm replaces a classifier. Without a projector the classifier is the backbone's, an
    ``Identity`` until ``reset_classifier(n)`` makes it ``Linear(num_features, n)`` (``n=0``: no
    classifier, the pooled features).
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module | None = None,
        *,
        config: ModelConfig,
        head: str = "backbone",
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.config = config
        self.head = head
        self.weights_sha256 = weights_sha256
        self.pretrained_cfg: dict[str, Any] = config.pretrained_cfg

    @property
    def name(self) -> str | None:
        return self.config.name

    @property
    def embed_dim(self) -> int:
        """D, the width of what ``forward`` returns."""
        if self.projector is not None and self.config.projector is not None:
            _, _, out_dim = self.config.projector
            return out_dim
        classes = int(getattr(self.backbone, "num_classes", 0) or 0)
        return classes or self.num_features

    # -- timm's model interface (see the class docstring) ------------------------------------

    @property
    def num_features(self) -> int:
        """timm's: the width of the pooled features, before any classifier or projector."""
        return int(self.backbone.num_features)

    @property
    def num_classes(self) -> int:
        """timm's: the width of the classifier's (or projector's) output; 0 without either, when
        ``forward`` returns the pooled features."""
        if self.projector is None and not getattr(self.backbone, "num_classes", 0):
            return 0
        return self.embed_dim

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's: the backbone's unpooled feature map, ``(N, num_features, h, w)`` for a ResNet."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's: pool the map ``forward_features`` returns, then apply the classifier (the
        projector, for ``head="projector"``); ``pre_logits=True`` returns the pooled features."""
        pooled = self.backbone.forward_head(x, pre_logits=True)
        if pre_logits:
            return pooled
        return self.get_classifier()(pooled)

    def get_classifier(self) -> nn.Module:
        """timm's: what ``forward_head`` applies after pooling: the projector, else the backbone's
        classifier (an ``Identity`` until ``reset_classifier``)."""
        if self.projector is not None:
            return self.projector
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's: a fresh ``Linear(num_features, num_classes)`` classifier (``0``: none, the pooled
        features), pooling by ``global_pool`` (``None`` keeps the current). The projector, if any, is
        the classifier this replaces: it is dropped. ``head`` becomes ``"classifier"`` (or, for
        ``num_classes=0``, ``"backbone"``), and once the output is no longer the published
        backbone's (a classifier, other pooling) ``weights_sha256`` is cleared: the identity
        becomes the tensors' digest."""
        current = getattr(getattr(self.backbone, "global_pool", None), "pool_type", None)
        self.backbone.reset_classifier(num_classes, global_pool if global_pool is not None else current)
        changed = num_classes > 0 or (global_pool or current) != current
        self.projector = None
        self.head = "classifier" if num_classes > 0 else "backbone"
        if changed:
            self.weights_sha256 = None

    @property
    def identity(self) -> ModelIdentity:
        """What this encoder is (``mec_hub.weights.identity``); for weights not read from a file with
        a digest (random, or set by hand), the tensors' digest, computed on each call."""
        return identity_of(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.projector is not None:
            features = self.projector(features)
        return features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, head={self.head!r}, embed_dim={self.embed_dim}"


def build_encoder(config: ModelConfig, *, head: str = "backbone") -> MECEncoder:
    """An encoder with random weights, shaped as ``config`` says."""
    if head not in HEADS:
        raise InvalidArgumentError(f"head must be one of {HEADS}, not {head!r}")
    backbone = build_backbone(config.architecture, config.model_args, config.stem)
    actual = getattr(backbone, "num_features", None)
    if actual != config.num_features:
        raise IncompatibleWeightsError(
            f"config says {config.architecture} has {config.num_features} features, the model has {actual}"
        )
    projector = None
    if head == "projector":
        if config.projector is None:
            raise IncompatibleWeightsError(
                f"model {config.name or config.architecture!r} has no published projector; use head='backbone'"
            )
        projector = build_projector(*config.projector)
    return MECEncoder(backbone, projector, config=config, head=head)


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, origin: str, target: str
) -> None:
    """``load_state_dict(strict=True)`` with an error a user can read: what is missing, extra or mis-shaped."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or mis_shaped:
        parts = []
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
        for label, keys in found:
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise IncompatibleWeightsError(
            f"weights in {origin} do not fit the {target} (wrong architecture for these weights?): " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)
