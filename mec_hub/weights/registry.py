"""The registry of published models: ``list_models``, ``model_info``, ``register``.

A model is a declarative record (``mec_hub.weights.record.ModelRecord``: its ``ModelConfig``
plus where its files are published); the code that loads one is generic
(``mec_hub.models.loading``). The registry owns its records: the zoo's are registered when this
module is imported, so a record a user registers joins them rather than hiding them. Imports
point one way: config <- record <- zoo <- registry.
"""

from __future__ import annotations

import difflib
import fnmatch

from mec_hub.errors import UnknownModelError
from mec_hub.weights.record import ModelRecord
from mec_hub.weights.zoo import PUBLISHED

__all__ = ["ModelRecord", "is_registered", "list_models", "model_info", "register", "unknown_model_message"]

_REGISTRY: dict[str, ModelRecord] = {}


def register(record: ModelRecord) -> ModelRecord:
    """Add a model (``ModelRecord(ModelConfig(name=..., ...), hf_repo_id=...)``) to the registry."""
    if not isinstance(record, ModelRecord):
        raise TypeError(f"register() takes a ModelRecord, not {type(record).__name__}")
    if record.name in _REGISTRY:
        raise ValueError(f"model {record.name!r} is registered twice")
    _REGISTRY[record.name] = record
    return record


for _record in PUBLISHED:
    register(_record)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the published models, sorted; ``pattern`` is a shell-style filter like ``"*resnet*"``."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_info(name: str) -> ModelRecord:
    """The record of a published model; an unknown name raises with the closest names suggested."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str (see mec_hub.list_models()), not {type(name).__name__}: {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(unknown_model_message(name)) from None


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))} (see `mec-hub list`)."
