"""The ``mec-hub`` model commands: output, error messages and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.hub import main
from mec_hub.weights.integrity import sha256_file
from tests.support import fakehub_push
from tests.support.official_checkpoint import make_official_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mec.pth.tar"
    make_official_checkpoint(path, arch="resnet18", dim=32, seed=0)
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from mec_hub.cli.hub import main; from mec_hub.cli.embed import main as e\n"
        "import click.testing as t\n"
        "r = t.CliRunner().invoke(main, ['--help']); r2 = t.CliRunner().invoke(e, ['--help'])\n"
        "print(r.exit_code, r2.exit_code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["0", "0", "False"], done.stderr


def test_console_scripts_answer_help():
    bindir = Path(sys.executable).parent
    for script in ("mec-hub", "mec-embed"):
        done = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr


def test_list_and_info():
    code, out = run("list")
    assert code == 0 and "mec_resnet50" in out and "UNVERIFIED" in out
    assert "linear (authors' protocol) top-1 70.8%" in out  # the headline figure names its protocol
    code, out = run("info", "mec_resnet50")
    info = json.loads(out)
    assert info["architecture"] == "resnet50" and info["meta"]["linear_paper_top1"] == 70.8
    assert info["source_env_var"] == "MEC_HUB_MEC_RESNET50_WEIGHTS"
    code, out = run("list", "--json", "nothing*")
    assert code == 0 and json.loads(out) == []


def test_unknown_model_suggests_close_names():
    code, out = run("info", "mec_resnet5")
    assert code == 2  # a usage error: no such model
    # Closest first; other registered names may follow.
    assert out.startswith("Error: Unknown model 'mec_resnet5'. Did you mean: mec_resnet50")
    assert "Traceback" not in out


def test_convert_prints_digests_and_refuses_to_overwrite(checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    code, out = run("convert", str(checkpoint), "--out", str(out_dir), "--name", "mec_test")
    assert code == 0, out
    digest = sha256_file(out_dir / "model.safetensors")
    assert f"model.safetensors  sha256 {digest}" in out
    fields = json.loads(out.split("registry fields: ")[1])
    assert fields["files"]["model.safetensors"] == digest and fields["num_features"] == 512

    code, out = run("convert", str(checkpoint), "--out", str(out_dir))
    assert code == 1 and "already exists; pass --overwrite" in out
    code, out = run("convert", str(checkpoint), "--out", str(out_dir), "--overwrite", "--from", "teacher")
    assert code == 0 and sha256_file(out_dir / "model.safetensors") != digest


def test_convert_without_from_exports_the_student(tmp_path):
    ckpt = tmp_path / "mec.pth.tar"
    original = make_official_checkpoint(ckpt, arch="resnet18", dim=32, seed=4)
    code, out = run("convert", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 0, out
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        student, teacher = original.pooled(x, "encoder"), original.pooled(x, "teacher")
        assert (student - teacher).abs().max() > 0.05  # the two networks of the checkpoint are told apart
        torch.testing.assert_close(mec_hub.load(weights=tmp_path / "out")(x), student, rtol=0, atol=1e-5)
        projected = mec_hub.load(weights=tmp_path / "out", head="projector")(x)
        torch.testing.assert_close(projected, original.encoder(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: p.write_bytes(b"garbage"), [], "not a readable PyTorch checkpoint"),
        (lambda p: None, [], "no such checkpoint file"),
        ("checkpoint", ["--arch", "resnet34"], "wrong architecture for these weights"),
        ("checkpoint", ["--arch", "no_such_net"], "field 'arch' is 'no_such_net', which is not one of timm's ResNet"),
        ("checkpoint", ["--arch", "hf-hub:org/x"], "field 'arch' must be a timm model name"),
    ],
)
def test_convert_errors_are_one_line(checkpoint, tmp_path, make, args, message):
    if make == "checkpoint":
        source = checkpoint
    else:
        source = tmp_path / "input.pth.tar"
        make(source)
    code, out = run("convert", str(source), "--out", str(tmp_path / "out"), *args)
    assert code == 1, out
    assert message in out and "Traceback" not in out
    assert out.count("\n") == 1


def test_download_offline_with_nothing_cached_says_what_to_do(tmp_path):
    # Relocated to a Hub repo (mec_resnet50 itself is not published yet, and is refused before any download).
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path),
        "MEC_HUB_MEC_RESNET50_WEIGHTS": "hf-hub:mec-test/mec_resnet50@0123abcd",
    }
    bindir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bindir / "mec-hub"), "download", "mec_resnet50"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1
    assert "Run `mec-hub download mec_resnet50` once while online, or pass local weights" in done.stderr
    assert "Traceback" not in done.stderr


def test_download_from_a_local_mirror_warns_when_unverified(checkpoint, tmp_path):
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    code, out = run("download", "mec_resnet50", "--weights", str(out_dir))
    assert code == 1 and "holds a resnet18, but model 'mec_resnet50' is a resnet50" in out


def test_push_dry_run_lists_files_and_sends_nothing(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("dry run must not contact the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    code, out = run("push", str(out_dir), "--repo-id", "org/mec_test", "--dry-run")
    assert code == 0, out
    for name in ("config.json", "model.safetensors", "projector.safetensors", "README.md"):
        assert name in out
    assert sha256_file(out_dir / "model.safetensors") in out
    assert "nothing was sent" in out


@pytest.fixture
def push_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", fakehub_push.TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    # With hf_xet installed, LFS files would go through the Xet protocol, which the fake Hub does not
    # serve; without it they take the LFS batch API's "basic" transfer (one PUT per object).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    server = fakehub_push.PushHub().start()
    yield server
    server.stop()


def test_push_sends_the_folder_over_the_hub_http_api(checkpoint, tmp_path, push_hub):
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    args = ["--repo-id", "org/mec_test", "--private", "--message", "First MEC weights", "--endpoint", push_hub.endpoint]
    code, out = run("push", str(out_dir), *args)
    assert code == 0, out

    repo = push_hub.repos["org/mec_test"]
    assert repo.create_payload == {"name": "mec_test", "organization": "org", "visibility": "private", "type": "model"}
    commit = repo.commits[repo.branches["main"]]
    assert commit.summary == "First MEC weights"
    on_disk = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert sorted(on_disk) == ["README.md", "config.json", "model.safetensors", "projector.safetensors"]
    pushed_card = on_disk["README.md"].replace(b"ORG/NAME", b"org/mec_test")  # the card names its repo
    assert commit.added == {**on_disk, "README.md": pushed_card}  # byte for byte, and nothing else
    inline, lfs = {"README.md", "config.json"}, {"model.safetensors", "projector.safetensors"}
    assert commit.modes == {**dict.fromkeys(inline, "regular"), **dict.fromkeys(lfs, "lfs")}
    assert f"pushed to {push_hub.endpoint}/org/mec_test (commit {commit.oid})" in out
    assert f"hf_revision={commit.oid!r}" in out


def test_push_to_a_new_branch_creates_it_and_leaves_main_alone(checkpoint, tmp_path, push_hub):
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    args = ["--repo-id", "org/mec_dev", "--revision", "dev", "--endpoint", push_hub.endpoint]
    code, out = run("push", str(out_dir), *args)
    assert code == 0, out
    repo = push_hub.repos["org/mec_dev"]
    assert repo.create_payload["visibility"] == "public"
    main_head, dev_head = repo.commits[repo.branches["main"]], repo.commits[repo.branches["dev"]]
    assert set(main_head.tree) == {".gitattributes"}  # the repo's first commit, untouched
    assert dev_head.parent == main_head.oid
    on_disk = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert dev_head.added == {**on_disk, "README.md": on_disk["README.md"].replace(b"ORG/NAME", b"org/mec_dev")}
    assert dev_head.summary == "Upload MEC weights (resnet18)"
    assert f"hf_revision={dev_head.oid!r}" in out

    code, out = run("push", str(out_dir), *args, "--message", "again")
    assert code == 0, out  # the branch exists now: pushed on top of it
    again = repo.commits[repo.branches["dev"]]
    assert again.parent == dev_head.oid and again.summary == "again"
    assert repo.branches["main"] == main_head.oid


def test_push_refuses_a_folder_whose_files_changed(checkpoint, tmp_path):
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    with open(out_dir / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    code, out = run("push", str(out_dir), "--repo-id", "org/mec_test", "--dry-run")
    assert code == 1 and "SHA-256 mismatch" in out


@pytest.mark.parametrize("repo_id", ["../../etc", "org/na me", "a/b/c", "org/-name"])
def test_push_refuses_a_repo_id_the_hub_would_reject(checkpoint, tmp_path, repo_id):
    out_dir = tmp_path / "r18"
    run("convert", str(checkpoint), "--out", str(out_dir))
    code, out = run("push", str(out_dir), "--repo-id", repo_id, "--dry-run")
    assert code == 2 and out.count("\n") == 1, out
    assert out.startswith(f"Error: bad Hugging Face repo id {repo_id!r}") and "nothing was sent" not in out
