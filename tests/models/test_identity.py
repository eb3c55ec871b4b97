"""One model identity: every runnable model satisfies ``EmbeddingModel`` and describes itself the same way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import mec_hub
from mec_hub.errors import MalformedFileError
from mec_hub.models.features import PooledStage
from mec_hub.models.protocol import EmbeddingModel, identity_of
from mec_hub.weights.identity import ModelIdentity


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_embedding_model(model: torch.nn.Module, images: torch.Tensor) -> ModelIdentity:
    assert isinstance(model, EmbeddingModel)
    identity = model.identity
    assert isinstance(identity, ModelIdentity)
    with torch.no_grad():
        out = model.eval()(images)
    assert out.shape == (len(images), identity.embed_dim) == (len(images), model.embed_dim)
    assert identity.head == model.head and dict(identity.preprocessing) == dict(model.pretrained_cfg)
    return identity


def test_torch_and_pooled_models_are_embedding_models_that_name_their_weights(tiny_weights_dir: Path):
    images = torch.randn(3, 3, 32, 32)
    file_digest = _file_sha256(tiny_weights_dir / "model.safetensors")
    config = json.loads((tiny_weights_dir / "config.json").read_text())

    backbone = mec_hub.load(weights=tiny_weights_dir)
    identity = _check_embedding_model(backbone, images)
    assert (identity.architecture, identity.head, identity.embed_dim) == (config["architecture"], "backbone", 512)
    assert identity.weights_sha256 == file_digest and identity.state_dict_sha256 is None
    assert identity.pooling is None and identity.runtime is None

    projector = _check_embedding_model(mec_hub.load(weights=tiny_weights_dir, head="projector"), images)
    assert (projector.head, projector.embed_dim) == ("projector", 128)
    assert projector.differences(identity) == ["head 'projector' instead of 'backbone'", "embed_dim 128 instead of 512"]

    pooled = _check_embedding_model(PooledStage(backbone, layer=3, pool="gem", gem_p=2.0), images)
    assert pooled.pooling == {"layer": 3, "pool": "gem", "gem_p": 2.0} and pooled.embed_dim == 256
    assert pooled.weights_sha256 == file_digest


def test_weights_without_a_file_are_named_by_their_tensors(tiny_weights_dir: Path):
    a = mec_hub.load(weights=tiny_weights_dir)
    a.weights_sha256 = None
    # An independent digest of the same tensors: equal for a copy, different after one value changes.
    b = mec_hub.load(weights=tiny_weights_dir)
    b.weights_sha256 = None
    assert a.identity.state_dict_sha256 == b.identity.state_dict_sha256 is not None
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert a.identity.state_dict_sha256 != b.identity.state_dict_sha256
    assert b.identity.differences(a.identity) == ["different weights (state_dict digest)"]


def test_a_users_own_module_gets_an_identity_from_what_it_carries():
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 5)
            self.pretrained_cfg = {"input_size": (3, 8, 8)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.mean(dim=(2, 3)))

    model = Tiny()
    identity = identity_of(model, embed_dim=5)
    reference = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        reference.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode() + tensor.numpy().tobytes())
    assert identity.architecture == "Tiny" and identity.embed_dim == 5
    assert identity.state_dict_sha256 == reference.hexdigest() and identity.weights_sha256 is None
    with pytest.raises(TypeError, match="no embed_dim"):
        identity_of(model)


def test_the_json_record_round_trips_and_bad_fields_are_named(tiny_weights_dir: Path):
    identity = mec_hub.load(weights=tiny_weights_dir).identity.replace(model="tiny", weights="/w")
    record = json.loads(json.dumps(identity.to_json()))
    assert list(record) == ["model", "weights", "weights_sha256", "architecture", "head", "embed_dim", "preprocessing"]
    back = ModelIdentity.from_json(record)
    assert back.to_json() == record and back.differences(identity) == []
    with pytest.raises(MalformedFileError, match=r"feats\.meta\.json: embed_dim is '512', expected int"):
        ModelIdentity.from_json({**record, "embed_dim": "512"}, origin="feats.meta.json")
    with pytest.raises(MalformedFileError, match="no model head recorded"):
        ModelIdentity.from_json({k: v for k, v in record.items() if k != "head"})
    # Preprocessing that resizes differently is a different model for the features' purposes.
    other = back.replace(preprocessing={**back.preprocessing, "crop_pct": 0.5})
    assert other.differences(back) and other.differences(back)[0].startswith("preprocessing")

