"""A registry entry: one model's description (``ModelConfig``) and where its files are published.

The record adds only the location: bundled in the package, a Hugging Face repo (pinned to a
revision once pushed) or an https URL. The SHA-256 of each file is part of the description
(``config.files``), exactly as the published ``config.json`` holds it; ``None`` for the model
file means not yet known, and loading then warns loudly that the file is unverified.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mec_hub.weights.config import MODEL_FILE, ModelConfig


@dataclass(frozen=True)
class ModelRecord:
    """One published MEC model: ``config`` (which must carry a ``name``) and where to fetch it."""

    config: ModelConfig
    bundled: str | None = None
    hf_repo_id: str | None = None
    hf_revision: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if not self.config.name:
            raise ValueError("a registry record needs a name: ModelConfig(name=..., ...)")

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def meta(self) -> Mapping[str, Any]:
        """Recipe, metrics and their source, license, paper: ``config.meta``."""
        return self.config.meta

    @property
    def sha256(self) -> str | None:
        """SHA-256 of ``model.safetensors`` (the headless backbone), ``None`` when not yet known."""
        return self.config.files.get(MODEL_FILE)

    @property
    def pinned(self) -> bool:
        """Whether the published location names one set of bytes: a known SHA-256 or a Hub revision."""
        return self.sha256 is not None or self.hf_revision is not None

    @property
    def source_env_var(self) -> str:
        """Environment variable that overrides where this model's weights are fetched from."""
        return f"MEC_HUB_{self.name.upper()}_WEIGHTS"

    def source_override(self) -> str | None:
        return os.environ.get(self.source_env_var) or None

    def locations(self) -> list[str]:
        """Where the weights can come from, most preferred first, as ``mec_hub.load`` specs."""
        override = self.source_override()
        if override:
            return [override]
        found = []
        if self.bundled:
            found.append(f"bundled:{self.bundled}")
        if self.hf_repo_id:
            rev = f"@{self.hf_revision}" if self.hf_revision else ""
            found.append(f"hf-hub:{self.hf_repo_id}{rev}")
        if self.url:
            found.append(self.url)
        return found

    def to_dict(self) -> dict[str, Any]:
        """Everything known about the model, as ``mec-hub info`` prints it."""
        config = self.config
        return {
            "name": self.name,
            "architecture": config.architecture,
            "num_features": config.num_features,
            "model_args": dict(config.model_args),
            "stem": config.stem,
            "preprocessing": config.pretrained_cfg,
            "projector": config.projector_dims,
            "files": dict(config.files),
            "meta": dict(config.meta),
            "bundled": self.bundled,
            "hf_repo_id": self.hf_repo_id,
            "hf_revision": self.hf_revision,
            "url": self.url,
            "source_env_var": self.source_env_var,
            "locations": self.locations(),
        }
