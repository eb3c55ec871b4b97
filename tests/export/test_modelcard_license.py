"""The license, figures and repo id of the cards `mec-hub convert` writes and `mec-hub push` sends, read back
with huggingface_hub (``ModelCard``, ``metadata_load``: what the Hub reads).

The expected values are independent of the card code: the authors' repository (github.com/xinliu20/MEC) is
under the MIT license and names no other terms for its checkpoints, which are trained on ImageNet; the
figures are the ones the registry record written here holds; the repo id is the one pushed to.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, constants
from huggingface_hub.repocard import metadata_load

from mec_hub.cli.hub import main
from mec_hub.errors import IncompatibleWeightsError
from mec_hub.export.convert import convert_checkpoint
from mec_hub.export.publish import push_folder
from mec_hub.weights import registry
from mec_hub.weights.record import ModelRecord
from tests.support import fakehub_push
from tests.support.official_checkpoint import make_official_checkpoint

IMAGENET_TERMS = "ImageNet's terms of access (https://image-net.org/download)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The authors' layout: {"epoch": 100, "arch", "state_dict": module.encoder.* ...}."""
    path = tmp_path_factory.mktemp("authors") / "checkpoint_0099.pth.tar"
    make_official_checkpoint(path, arch="resnet18", dim=32, seed=1)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "r18"
    result = CliRunner().invoke(main, ["convert", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def tiny_record(monkeypatch: pytest.MonkeyPatch) -> ModelRecord:
    """A registry record of the authors' checkpoint, with figures, their protocol and source."""
    base = registry.model_info("mec_resnet50").config
    meta = {
        "pretraining": "MEC on ImageNet-1k, 100 epochs",
        "epochs": 100,
        "linear_paper_top1": 55.5,
        "knn_top1": 44.25,
        "eval_data": "ImageNet-1k val (50,000 images)",
        "metrics_source": "the authors' repository README",
        "metrics_source_url": "https://github.com/xinliu20/MEC#models-and-logs",
        "license": "MIT (github.com/xinliu20/MEC)",
    }
    config = replace(base, name="mec_tiny_authors", architecture="resnet18", num_features=512, meta=meta)
    record = ModelRecord(config, hf_repo_id="mec-test/mec_tiny_authors")
    monkeypatch.setitem(registry._REGISTRY, record.name, record)
    return record


def test_the_authors_checkpoint_is_mit_with_imagenets_terms(converted):
    metadata = metadata_load(converted / "README.md")
    assert metadata["license"] == "mit" and metadata["datasets"] == ["imagenet-1k"]
    assert "model-index" not in metadata  # the checkpoint carries no figures, and no record names it
    card = ModelCard.load(converted / "README.md")
    assert card.data.license == "mit"
    assert "## License" in card.text and "xinliu20/MEC" in card.text
    assert f"Trained on ImageNet-1k: {IMAGENET_TERMS} apply to the use of these weights" in card.text


def test_a_registered_name_gives_the_card_its_records_figures_with_their_protocol(checkpoint, tiny_record, tmp_path):
    folder = convert_checkpoint(checkpoint, tmp_path / "named", name=tiny_record.name).folder
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.model_name == tiny_record.name
    results = {r.metric_name: r for r in card.data.eval_results}
    assert {name: r.metric_value for name, r in results.items()} == {
        "Linear top-1 (%), the authors' protocol": 55.5,
        "kNN top-1 (%)": 44.25,
    }
    for result in results.values():
        assert (result.dataset_type, result.dataset_split) == ("imagenet-1k", "validation")
        assert result.source_url == "https://github.com/xinliu20/MEC#models-and-logs"
        assert result.source_name == "the authors' repository README"
    assert "main_lincls.py with --lars" in card.text  # the authors' protocol, spelled out in the details
    assert "k=20, T=0.07" in card.text  # the kNN protocol
    assert "**Source checkpoint**: checkpoint_0099.pth.tar" in card.text  # what the checkpoint says wins


def test_a_registered_name_of_another_model_is_refused(checkpoint, tiny_record, tmp_path, monkeypatch):
    with pytest.raises(IncompatibleWeightsError, match="'mec_resnet50' of the registry is a resnet50"):
        convert_checkpoint(checkpoint, tmp_path / "r50", name="mec_resnet50")
    longer = ModelRecord(replace(tiny_record.config, meta={**tiny_record.meta, "epochs": 800}))
    monkeypatch.setitem(registry._REGISTRY, longer.name, longer)
    with pytest.raises(IncompatibleWeightsError, match=r"trained for 100 epochs, but model 'mec_tiny_authors'.* 800"):
        convert_checkpoint(checkpoint, tmp_path / "800", name=longer.name)


@pytest.fixture
def push_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fakehub_push.TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub serves LFS, not Xet
    server = fakehub_push.PushHub().start()
    yield server
    server.stop()


def test_the_pushed_card_names_its_repo_and_holds_no_placeholder(converted, push_hub):
    repo_id = "mec-test/mec_resnet18.authors"
    planned = {name: digest for name, _, digest in push_folder(converted, repo_id, dry_run=True).files}
    push_folder(converted, repo_id, endpoint=push_hub.endpoint)
    repo = push_hub.repos[repo_id]
    pushed = repo.commits[repo.branches["main"]].added["README.md"]
    assert hashlib.sha256(pushed).hexdigest() == planned["README.md"]  # the dry run lists the card that is sent
    card = ModelCard(pushed.decode("utf-8"))
    assert "ORG/NAME" not in card.text and "ORG/NAME" not in card.content
    assert f"mec_hub.load(weights='hf-hub:{repo_id}')" in card.text
    assert f"timm.create_model('hf-hub:{repo_id}', pretrained=True)" in card.text
    assert card.data.license == "mit"
    local = ModelCard.load(converted / "README.md")
    assert card.data.to_dict() == local.data.to_dict()  # the metadata goes as written
