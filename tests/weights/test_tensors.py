"""mec_hub.weights.tensors, the one reader of .safetensors files, and the loaders that call it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mec_hub
from mec_hub.errors import CheckpointReadError
from mec_hub.export.transfer import read_backbone
from mec_hub.weights.tensors import read_safetensors, read_safetensors_metadata
from tests.support.weights import make_tiny_hub_folder


def test_reads_what_safetensors_wrote(tmp_path: Path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    read = read_safetensors(tmp_path / "x.safetensors", origin="spec")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert read_safetensors_metadata(tmp_path / "x.safetensors", origin="spec") == {"k": "v"}


@pytest.mark.parametrize("reader", [read_safetensors, read_safetensors_metadata])
def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path, reader):
    """Opening a FIFO for reading blocks until a writer comes: it must be refused, not waited on."""
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointReadError, match=r"spec: .*model.safetensors is not a regular file"):
        reader(tmp_path / "model.safetensors", origin="spec")


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_a_truncated_file_is_one_error_naming_the_file_and_spec(tmp_path: Path, cut: int):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    for reader in (read_safetensors, read_safetensors_metadata):
        if reader is read_safetensors_metadata and cut == -1:
            continue  # the header is whole: safetensors reads it without the last byte of data
        with pytest.raises(CheckpointReadError, match=r"^hf-hub:o/n: cannot read .*cut.safetensors as safetensors"):
            reader(tmp_path / "cut.safetensors", origin="hf-hub:o/n")


def test_every_loader_reports_a_corrupt_file_the_same_way(tmp_path: Path):
    """mec_hub.load and convert --to torchvision|detectron2 read model.safetensors through the one reader."""
    folder = make_tiny_hub_folder(tmp_path / "hub")
    model = folder / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    config = json.loads((folder / "config.json").read_text())
    del config["mec_hub"]["files"]  # no digest to catch it first: the reader itself must
    (folder / "config.json").write_text(json.dumps(config))
    expected = r"cannot read .*model.safetensors as safetensors, corrupted or truncated"
    with pytest.raises(CheckpointReadError, match=expected):
        mec_hub.load(weights=str(folder))
    with pytest.raises(CheckpointReadError, match=expected):
        read_backbone(str(model))
