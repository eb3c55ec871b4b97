"""Downloads from a Hugging Face Hub served by the test on 127.0.0.1, and their verification."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mec_hub
from mec_hub.errors import ChecksumMismatchError, WeightsNotFoundError
from mec_hub.weights import registry
from mec_hub.weights.config import read_config
from mec_hub.weights.integrity import UnverifiedWeightsWarning
from mec_hub.weights.record import ModelRecord
from tests.support.fakehub import FakeHub, folder_files
from tests.support.weights import make_tiny_hub_folder

REPO = "mec-test/tiny_resnet18"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hubfolders")
    return {
        "v1": make_tiny_hub_folder(base / "v1", seed=1),
        "v2": make_tiny_hub_folder(base / "v2", seed=2),
    }


@pytest.fixture
def hub(folders):
    server = FakeHub()
    repo = server.repo(REPO)
    server.first_commit = repo.add_commit(folder_files(folders["v1"]))
    server.second_commit = repo.add_commit(folder_files(folders["v2"]))
    server.start()
    yield server
    server.stop()


def _reference(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return mec_hub.load(weights=folder)(X)


def _cached_blobs(cache: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.rglob("blobs/*") if p.is_file()}


def test_download_verifies_and_reuses_the_cache_when_the_server_is_gone(hub, folders, tmp_path):
    cache = tmp_path / "hf"
    model = mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v2"]), rtol=0, atol=0)
    expected = json.loads((folders["v2"] / "config.json").read_text())["mec_hub"]["files"]["model.safetensors"]
    assert model.weights_sha256 == expected
    assert hub.downloads("model.safetensors") == 1

    endpoint = hub.endpoint
    hub.stop()
    again = mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=endpoint)
    with torch.no_grad():
        torch.testing.assert_close(again(X), model(X), rtol=0, atol=0)


def test_revision_pin_selects_the_commit(hub, folders, tmp_path):
    pinned = mec_hub.load(weights=f"hf-hub:{REPO}@{hub.first_commit}", cache_dir=tmp_path, endpoint=hub.endpoint)
    with torch.no_grad():
        torch.testing.assert_close(pinned(X), _reference(folders["v1"]), rtol=0, atol=0)
        assert not torch.allclose(pinned(X), _reference(folders["v2"]))


def test_corrupted_byte_is_refused_and_not_cached(hub, folders, tmp_path):
    good = (folders["v2"] / "model.safetensors").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    hub.tamper[(REPO, "model.safetensors")] = bytes(bad)
    cache = tmp_path / "hf"
    with pytest.raises(ChecksumMismatchError) as info:
        mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)
    message = str(info.value)
    assert hashlib.sha256(good).hexdigest() in message and hashlib.sha256(bad).hexdigest() in message
    assert "removed from the cache" in message
    assert hashlib.sha256(bad).hexdigest() not in _cached_blobs(cache)

    del hub.tamper[(REPO, "model.safetensors")]
    model = mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v2"]), rtol=0, atol=0)


def test_missing_file_revision_and_repo_give_clear_errors(hub, folders, tmp_path):
    hub.repo("mec-test/no_weights").add_commit({"config.json": (folders["v1"] / "config.json").read_bytes()})
    with pytest.raises(WeightsNotFoundError, match=r"mec-test/no_weights has no file 'model\.safetensors'"):
        mec_hub.load(weights="hf-hub:mec-test/no_weights", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(WeightsNotFoundError, match="revision 'v9' does not exist"):
        mec_hub.load(weights=f"hf-hub:{REPO}@v9", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(WeightsNotFoundError, match="repository not found"):
        mec_hub.load(weights="hf-hub:mec-test/nothing", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(WeightsNotFoundError, match=r"no file 'projector\.safetensors'"):
        hub.repo("mec-test/backbone_only").add_commit(
            {k: v for k, v in folder_files(folders["v1"]).items() if k != "projector.safetensors"}
        )
        mec_hub.load(
            weights="hf-hub:mec-test/backbone_only", head="projector", cache_dir=tmp_path, endpoint=hub.endpoint
        )


def test_projector_head_downloads_the_projector(hub, folders, tmp_path):
    model = mec_hub.load(weights=f"hf-hub:{REPO}", head="projector", cache_dir=tmp_path, endpoint=hub.endpoint)
    reference = mec_hub.load(weights=folders["v2"], head="projector")
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)
    assert model.embed_dim == 128


def test_url_download_is_cached_and_unverified_without_a_digest(hub, folders, tmp_path):
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    with pytest.warns(UnverifiedWeightsWarning):
        model = mec_hub.load(weights=url, cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v2"]), rtol=0, atol=0)
    endpoint = hub.endpoint
    hub.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedWeightsWarning)
        mec_hub.load(weights=url, cache_dir=tmp_path)  # from the cache: the server is gone
    with pytest.raises(WeightsNotFoundError, match="cannot be downloaded"):
        mec_hub.load(weights=f"{endpoint}/{REPO}/resolve/main/other.safetensors", cache_dir=tmp_path)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


@pytest.mark.slow
def test_offline_mode_uses_the_cache_and_explains_an_empty_one(hub, folders, tmp_path):
    cache = tmp_path / "hf"
    mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)
    requests_before = len(hub.requests)
    code = f"import mec_hub, torch\nm = mec_hub.load(weights='hf-hub:{REPO}')\nprint(m.weights_sha256)\n"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.endpoint}
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    expected = json.loads((folders["v2"] / "config.json").read_text())["mec_hub"]["files"]["model.safetensors"]
    assert done.stdout.strip() == expected
    assert len(hub.requests) == requests_before  # offline means not a single request

    empty = _run(code, {**env, "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert empty.returncode != 0
    assert "not in the local cache" in empty.stderr and "weights=PATH" in empty.stderr


def _register_tiny(monkeypatch, sha256: str | None, **location) -> ModelRecord:
    config = read_config(Path(location.pop("folder")))
    files = {"model.safetensors": sha256} if sha256 else {}
    record = ModelRecord(replace(config, name="tiny_test", files=files), **location)
    monkeypatch.setitem(registry._REGISTRY, record.name, record)
    return record


def test_a_repo_that_names_a_registry_model_is_checked_against_its_record(hub, folders, tmp_path, monkeypatch):
    """The repo's config.json calls its model tiny_resnet18; the registry's tiny_resnet18 is v1, main is v2."""
    v1 = read_config(folders["v1"])
    record = ModelRecord(v1, hf_repo_id=REPO, hf_revision=hub.first_commit)
    monkeypatch.setitem(registry._REGISTRY, v1.name, record)
    cache = tmp_path / "hf"
    v2_digest = hashlib.sha256((folders["v2"] / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ChecksumMismatchError, match=f"expected {v1.files['model.safetensors']}, got {v2_digest}"):
        mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)
    assert v2_digest not in _cached_blobs(cache)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mec_hub.load(weights=f"hf-hub:{REPO}@{hub.first_commit}", cache_dir=cache, endpoint=hub.endpoint)
    assert model.name == v1.name
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v1"]), rtol=0, atol=0)


def test_registry_entry_downloads_from_its_pinned_repo(hub, folders, tmp_path, monkeypatch):
    digest = read_config(folders["v1"]).files["model.safetensors"]
    _register_tiny(monkeypatch, digest, folder=folders["v1"], hf_repo_id=REPO, hf_revision=hub.first_commit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mec_hub.load("tiny_test", cache_dir=tmp_path, endpoint=hub.endpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v1"]), rtol=0, atol=0)


def test_registry_digest_is_authoritative(hub, folders, tmp_path, monkeypatch):
    wrong = "0" * 64
    _register_tiny(monkeypatch, wrong, folder=folders["v1"], hf_repo_id=REPO)
    with pytest.raises(ChecksumMismatchError, match=f"expected {wrong}"):
        mec_hub.load("tiny_test", cache_dir=tmp_path, endpoint=hub.endpoint)


def test_registry_entry_without_digest_warns_and_env_relocates_it(hub, folders, tmp_path, monkeypatch):
    record = _register_tiny(monkeypatch, None, folder=folders["v1"], hf_repo_id="mec-test/not-published-yet")
    monkeypatch.setenv(record.source_env_var, str(folders["v1"]))
    with pytest.warns(UnverifiedWeightsWarning, match="UNVERIFIED WEIGHTS: model.safetensors of tiny_test"):
        model = mec_hub.load("tiny_test")
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v1"]), rtol=0, atol=0)


@pytest.mark.slow  # 6 s: timm's own download and model creation
def test_timm_reads_our_hub_repos(hub, folders, tmp_path):
    """A repo we publish loads in timm without mec_hub, identically."""
    cache = tmp_path / "hf"
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    code = (
        "import timm, torch, mec_hub\n"
        f"x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        f"t = timm.create_model('hf-hub:{REPO}', pretrained=True).eval()\n"
        f"m = mec_hub.load(weights='hf-hub:{REPO}')\n"
        "with torch.no_grad():\n"
        "    print(float((t(x) - m(x)).abs().max()))\n"
        "print(list(t.pretrained_cfg['input_size']))\n"
    )
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    diff, size = done.stdout.strip().splitlines()
    assert float(diff) == 0.0 and size == "[3, 32, 32]"


def _flip_one_byte(path: Path) -> bytes:
    """Corrupt a cached file in place (through a Hugging Face cache symlink, its blob); return the bad bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def _assert_cached_copy_refused(load, cached: Path, good: bytes, downloads) -> bytes:
    """Flip a byte of ``cached``: the next load must refuse it without downloading, and remove it."""
    downloads_before = downloads()
    bad = _flip_one_byte(cached)
    with pytest.raises(ChecksumMismatchError) as info:
        load()
    assert downloads() == downloads_before  # the copy checked was the cached one, not a new download
    message = str(info.value)
    assert hashlib.sha256(good).hexdigest() in message and hashlib.sha256(bad).hexdigest() in message
    assert "removed from the cache" in message
    assert not cached.exists() and not cached.is_symlink()
    return bad


def test_cached_hub_file_is_verified_again_on_every_load(hub, folders, tmp_path):
    cache = tmp_path / "hf"

    def load():
        return mec_hub.load(weights=f"hf-hub:{REPO}", cache_dir=cache, endpoint=hub.endpoint)

    load()
    (cached,) = cache.rglob("snapshots/*/model.safetensors")
    good = (folders["v2"] / "model.safetensors").read_bytes()
    assert cached.read_bytes() == good
    bad = _assert_cached_copy_refused(load, cached, good, lambda: hub.downloads("model.safetensors"))
    assert hashlib.sha256(bad).hexdigest() not in _cached_blobs(cache)  # the blob went with its symlink

    model = load()  # downloads a good copy again
    assert hub.downloads("model.safetensors") == 2
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v2"]), rtol=0, atol=0)


def test_cached_url_file_is_verified_again_on_every_load(hub, folders, tmp_path, monkeypatch):
    good = (folders["v2"] / "model.safetensors").read_bytes()
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    _register_tiny(monkeypatch, hashlib.sha256(good).hexdigest(), folder=folders["v2"], url=url)
    cache = tmp_path / "urls"

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the registry's digest vouches for the file: no warning
            return mec_hub.load("tiny_test", cache_dir=cache)

    load()
    (cached,) = (p for p in cache.rglob("*") if p.is_file())
    assert cached.read_bytes() == good
    _assert_cached_copy_refused(load, cached, good, lambda: hub.downloads("model.safetensors"))

    model = load()  # downloads a good copy again
    assert hub.downloads("model.safetensors") == 2
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(folders["v2"]), rtol=0, atol=0)
