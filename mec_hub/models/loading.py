"""``mec_hub.load``: a verified, headless MEC encoder from any weights spec; ``mec_hub.create_model``:
the same architecture with random weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from mec_hub.errors import InvalidArgumentError
from mec_hub.models.encoder import MECEncoder, build_encoder, load_state_dict_strict
from mec_hub.models.features import feature_model
from mec_hub.runtime.devices import resolve_device
from mec_hub.weights.config import ModelConfig
from mec_hub.weights.record import ModelRecord
from mec_hub.weights.registry import model_info
from mec_hub.weights.sources import (
    WeightsSpec,
    fetch_weights,
    location_config,
    parse_weights_spec,
    record_location,
)
from mec_hub.weights.tensors import read_safetensors

DEFAULT_MODEL = "mec_resnet18_cifar10s"


def without_classifier(state: dict[str, torch.Tensor], classifier: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``state`` less the weights of the ``classifier`` modules (``ModelConfig.classifier``)."""
    prefixes = tuple(f"{name}." for name in classifier)
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def _architecture(name: str | None, config: ModelConfig | str | os.PathLike[str] | None) -> ModelConfig:
    """The description ``create_model`` builds: that of ``config``, else of model ``name`` (or the default model)."""
    if name is not None and config is not None:
        raise InvalidArgumentError(
            "name= and config= both say which architecture to build; pass one of them", arguments=("name", "config")
        )
    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        spec = parse_weights_spec(config)
        if spec.kind == "registry":
            name = spec.value
        elif spec.kind != "default":
            return location_config(spec)  # its config.json or header; its weights are not read
    return model_info(name or DEFAULT_MODEL).config


def create_model(
    name: str | None = None,
    *,
    config: ModelConfig | str | os.PathLike[str] | None = None,
    head: str = "backbone",
    device: str | torch.device = "cpu",
) -> MECEncoder:
    """An MEC encoder with random weights, in eval mode (timm's ``create_model(..., pretrained=False)``).

    Args:
        name: a registry name: its architecture, projector and preprocessing. The default model
            when both ``name`` and ``config`` are omitted.
        config: the architecture to build instead: a ``ModelConfig``, or a local weights spec
            whose description is read, never its weights: a folder written by ``mec-hub
            convert`` (or a timm folder), a ``.safetensors`` file, ``bundled:NAME``, a registry
            name or ``"DEFAULT"``. A download (``hf-hub:``, a URL) names no architecture until it
            is fetched, and is refused.
        head, device: as for :func:`load`.

    The weights are drawn from torch's global generator (``torch.manual_seed`` makes the draw
    repeatable); the encoder carries no weights digest (``weights_sha256`` is ``None``).
    ``load(name, pretrained=False)`` is ``create_model(name)``.
    """
    device = resolve_device(device)
    description = _architecture(name, config)
    # Random weights are not the published files: the description keeps no digests.
    return build_encoder(replace(description, files={}), head=head).to(device).eval()


def load(
    name: str | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    head: str = "backbone",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    sha256: str | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
) -> MECEncoder | nn.Module:
    """Load an MEC encoder mapping ``(N, 3, H, W)`` images to ``(N, D)`` embeddings, in eval mode.

    Args:
        name: a registry name (see ``mec_hub.list_models()``); the default model when ``name``
            is omitted and ``weights`` is too (or is ``"DEFAULT"``).
        weights: where to take the weights from: a registry name, a local ``.safetensors`` file,
            a folder written by ``mec-hub convert``, ``hf-hub:org/name[@revision]`` or an https
            URL. Given together with ``name``, it relocates that model's published files (a
            mirror, a local copy), which are still checked against the model's SHA-256.
            ``None`` (omitted) or ``"DEFAULT"`` (torchvision's word): the model's own published
            weights. Unlike torchvision, ``None`` does not mean random weights: that is
            ``pretrained=False``.
        pretrained: ``False`` returns the architecture of ``name`` (the default model without
            one) with random weights, as :func:`create_model` does (which also builds that of a
            weights folder or file). Refused together with ``weights=``, which names weights to
            load where ``pretrained=False`` loads none.
        head: ``"backbone"`` (pooled features) or ``"projector"`` (the MEC projector's output).
        device: where to put the model: ``cpu``, ``cuda[:N]`` or ``auto`` (a GPU if there is one).
        cache_dir, endpoint: passed to huggingface_hub (default: its own settings).
        sha256: the SHA-256 you trust for ``model.safetensors`` (64 hex digits), for weights no
            registry vouches for (another publisher's Hub repo, a URL): a file that differs is
            refused, and the weights load without the unverified warning.
        features_only: return timm's ``features_only`` model instead (a list of stage feature maps,
            ``feature_info`` with their channels and reductions; see ``mec_hub.models.features``),
            holding the same verified weights; ``out_indices`` picks the stages (timm's numbering,
            for a ResNet ``(1, 2, 3, 4)`` are the four stages; default: timm's for the architecture).

    Every file is checked against its SHA-256 before it is read; a mismatching download is
    removed from the cache. Keys are loaded strictly; a timm folder's classifier (``fc`` of a
    ``config.json`` with ``num_classes > 0``) is left out, as for ``timm.create_model(...,
    num_classes=0)``.
    """
    device = resolve_device(device)  # an unknown device is refused before anything is fetched
    if features_only:
        hub_args = {"cache_dir": cache_dir, "endpoint": endpoint}
        encoder = load(name, weights=weights, pretrained=pretrained, head=head, sha256=sha256, **hub_args)
        return feature_model(encoder, out_indices).to(device)
    if not pretrained:
        if weights is not None:
            raise InvalidArgumentError(
                "weights= and pretrained=False were both given: weights= names weights to load, "
                "pretrained=False loads none. For random weights drop weights=; for random weights "
                "in the architecture of a weights folder or file use mec_hub.create_model(config=...)",
                arguments=("weights", "pretrained"),
            )
        if sha256 is not None:
            raise InvalidArgumentError(
                "sha256= pins weights to load; with pretrained=False none are loaded",
                arguments=("sha256", "pretrained"),
            )
        return create_model(name, head=head, device=device)

    spec: WeightsSpec | None = parse_weights_spec(weights) if weights is not None else None
    if spec is not None and spec.kind == "default":
        spec = None  # the model's own published weights, as when none are given
    if spec is not None and spec.kind == "registry":
        if name is not None and name != spec.value:
            raise InvalidArgumentError(
                f"name={name!r} and weights={spec.value!r} name two different models", arguments=("name", "weights")
            )
        name, spec = spec.value, None
    if name is None and spec is None:
        name = DEFAULT_MODEL
    record: ModelRecord | None = model_info(name) if name is not None else None

    if spec is None:
        assert record is not None
        spec = record_location(record)
    local = fetch_weights(
        spec,
        record=record,
        want_projector=head == "projector",
        cache_dir=cache_dir,
        endpoint=endpoint,
        sha256=sha256,
    )
    encoder = build_encoder(local.config, head=head)
    target = f"{local.config.architecture} backbone"
    state = without_classifier(read_safetensors(local.model_file, origin=local.origin), local.config.classifier)
    load_state_dict_strict(encoder.backbone, state, origin=local.origin, target=target)
    if encoder.projector is not None:
        assert local.projector_file is not None
        load_state_dict_strict(
            encoder.projector,
            read_safetensors(local.projector_file, origin=local.origin),
            origin=local.origin,
            target="MEC projector",
        )
    encoder.weights_sha256 = local.sha256
    return encoder.to(device).eval()
