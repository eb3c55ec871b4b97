"""``mec-embed``: outputs equal a plain forward, odd files are accounted for, nothing is clobbered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import EXIT_STRICT, main
from tests.support.embedding import make_images, read_manifest, reference_features
from tests.support.paths import REPO_ROOT


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_photos_match_a_plain_forward(photos_dir: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "feats.npy"
    result = run(photos_dir, "--out", out, "--weights", tiny_weights_dir, "--device", "cpu", "-b", 5, "-j", 1)
    assert result.exit_code == 0, result.output
    names = (tmp_path / "feats.paths.txt").read_text().splitlines()
    assert names == sorted(p.name for p in photos_dir.iterdir())  # relative to the single input folder
    features = np.load(out, mmap_mode="r")
    assert features.shape == (18, 512) and features.dtype == np.float32
    np.testing.assert_allclose(
        features, reference_features(tiny_weights_dir, [photos_dir / n for n in names]), rtol=1e-5, atol=1e-5
    )

    meta = json.loads((tmp_path / "feats.meta.json").read_text())
    import mec_hub

    assert meta["weights"] == str(tiny_weights_dir.resolve()) and meta["model"] is None
    assert meta["weights_sha256"] == mec_hub.load(weights=tiny_weights_dir).weights_sha256
    assert meta["shape"] == [18, 512] and meta["embed_dim"] == 512 and meta["head"] == "backbone"
    assert meta["format"] == "mec-embed" and meta["format_version"] == 1
    assert meta["num_embedded"] == 18 and meta["num_failed"] == 0 and meta["failed"] == []
    assert meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert meta["mec_hub_version"] == mec_hub.__version__
    assert meta["started_at"] <= meta["finished_at"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.meta.json", "feats.npy", "feats.paths.txt"]


def test_odd_images_every_file_accounted_for(odd_images_dir: Path, tiny_weights_dir: Path, tmp_path: Path):
    manifest = read_manifest(odd_images_dir)
    loadable = {row["file"] for row in manifest if row["loads"] == "yes"}
    broken = {row["file"] for row in manifest if row["loads"] == "no"}
    assert len(loadable) == 23 and len(broken) == 7  # as the manifest's README describes

    out = tmp_path / "odd.npy"
    result = run(odd_images_dir, "--out", out, "--weights", tiny_weights_dir, "--device", "cpu", "-b", 8, "-j", 1)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "odd.meta.json").read_text())
    embedded = (tmp_path / "odd.paths.txt").read_text().splitlines()
    failed = {entry["path"]: entry["reason"] for entry in meta["failed"]}
    assert set(embedded) == loadable and set(failed) == broken
    assert embedded == sorted(embedded)
    assert np.load(out).shape == (23, 512) and meta["num_embedded"] == 23 and meta["num_failed"] == 7
    assert meta["num_inputs"] == 30 and meta["num_skipped_non_images"] == 1  # MANIFEST.tsv
    for path, reason in failed.items():
        assert reason and "Traceback" not in reason and "\n" not in reason, path
    assert failed["empty.jpg"] == "empty file (0 bytes)"
    assert failed["not_an_image.jpg"] == "not an image file (unrecognised format)"
    assert failed["truncated.png"].startswith("truncated image data")
    assert failed["decompression_bomb.gif"].startswith("decompression bomb: 4364696535 pixels")
    # the summary names every failure without a traceback
    assert "7 failed" in result.output and "Traceback" not in result.output

    strict = run(
        odd_images_dir,
        "--out",
        tmp_path / "strict.npy",
        "--weights",
        tiny_weights_dir,
        "--device",
        "cpu",
        "-j",
        0,
        "--strict",
    )
    assert strict.exit_code == EXIT_STRICT, strict.output
    assert np.load(tmp_path / "strict.npy").shape == (23, 512)  # outputs are written all the same


def test_nothing_embedded_is_an_error(odd_images_dir: Path, tiny_weights_dir: Path, tmp_path: Path):
    result = run(
        odd_images_dir / "empty.jpg",
        odd_images_dir / "truncated.png",
        "--out",
        tmp_path / "f.npy",
        "--weights",
        tiny_weights_dir,
        "--device",
        "cpu",
        "-j",
        0,
    )
    assert result.exit_code == 1
    assert "no image could be embedded" in result.output


def test_existing_outputs_are_not_clobbered(tiny_weights_dir: Path, tmp_path: Path):
    make_images(tmp_path / "imgs", 4)
    out = tmp_path / "f.npy"
    args = [tmp_path / "imgs", "--out", out, "--weights", tiny_weights_dir, "--device", "cpu", "-j", 0]
    assert run(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("f.*")}

    make_images(tmp_path / "imgs", 6, seed=1, prefix="more")
    again = run(*args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert {p.name: p.read_bytes() for p in tmp_path.glob("f.*")} == before

    changed = run(*args, "--resume")  # the inputs changed: not the same run
    assert changed.exit_code == 1 and "other inputs or options" in changed.output
    assert {p.name: p.read_bytes() for p in tmp_path.glob("f.*")} == before

    replaced = run(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert np.load(out).shape == (10, 512)
    assert run(*args, "--resume").exit_code == 0  # same inputs and options, complete: nothing to do
    assert run(*args, "--resume", "--overwrite").exit_code == 1


def test_errors_before_any_work(tiny_weights_dir: Path, tmp_path: Path):
    make_images(tmp_path / "imgs", 2)
    missing = run(tmp_path / "imgs", tmp_path / "nope", "--out", tmp_path / "f.npy", "--weights", tiny_weights_dir)
    assert missing.exit_code == 1 and "input not found" in missing.output and "nope" in missing.output
    (tmp_path / "afile").write_text("x")
    blocked = run(tmp_path / "imgs", "--out", tmp_path / "afile" / "f.npy", "--weights", tiny_weights_dir)
    assert blocked.exit_code == 1 and "cannot create output folder" in blocked.output
    # the output check comes first: a bad --weights is not even looked at
    unwritable = run(tmp_path / "imgs", "--out", tmp_path / "afile" / "f.npy", "--weights", tmp_path / "nowhere")
    assert "cannot create output folder" in unwritable.output
    no_input = run("--out", tmp_path / "f.npy")
    assert no_input.exit_code == 2 and "--files-from" in no_input.output
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    no_images = run(tmp_path / "texts", "--out", tmp_path / "f.npy", "--weights", tiny_weights_dir, "--device", "cpu")
    assert no_images.exit_code == 1 and "no image files found" in no_images.output
    assert "1 file(s) or tar member(s) not images, left out" in no_images.output
    assert list(tmp_path.glob("*.npy")) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses sysfs, Linux's /sys")
def test_unwritable_output_folder(tiny_weights_dir: Path, tmp_path: Path):
    # A folder that exists but where no one, root included, can create a file: sysfs refuses new
    # files (EACCES; EROFS where /sys is mounted read-only), unlike a chmod 555 folder that root ignores.
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    assert mounts.get("/sys") == "sysfs", "this test needs sysfs mounted at /sys"
    make_images(tmp_path / "imgs", 2)
    result = run(tmp_path / "imgs", "--out", "/sys/f.npy", "--weights", tiny_weights_dir, "--device", "cpu")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write to output folder /sys: "), result.output
    assert not Path("/sys/f.npy").exists()


def test_default_model_comes_from_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mec_hub.models.loading

    make_images(tmp_path / "imgs", 1)
    monkeypatch.setattr(mec_hub.models.loading, "DEFAULT_MODEL", "no_such_default_model")
    result = run(tmp_path / "imgs", "--out", tmp_path / "f.npy", "--device", "cpu")
    assert result.exit_code == 2 and "no_such_default_model" in result.output  # a name that does not exist


def test_files_from_and_globs(tiny_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = make_images(tmp_path / "imgs", 6)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[4]}\n{paths[1]}\n{tmp_path / 'gone.png'}\n")
    monkeypatch.chdir(tmp_path)
    result = run(
        "imgs/*0.png",
        "--files-from",
        listing,
        "--out",
        "f.npy",
        "--weights",
        tiny_weights_dir,
        "--device",
        "cpu",
        "-j",
        0,
    )
    assert result.exit_code == 0, result.output
    names = (tmp_path / "f.paths.txt").read_text().splitlines()
    assert names == ["imgs/img0000.png", str(paths[4]), str(paths[1])]
    meta = json.loads((tmp_path / "f.meta.json").read_text())
    assert meta["failed"] == [{"path": str(tmp_path / "gone.png"), "reason": "file not found"}]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mec_hub.cli.embed import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "assert result.exit_code == 0 and '--files-from' in result.output, result.output\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy', 'PIL') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
