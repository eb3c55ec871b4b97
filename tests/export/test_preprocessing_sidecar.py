"""``export.preprocessing`` in ``FILE.json``: the resize rule, crop, scaling, mean/std, channel order
and layout as explicit fields, enough to re-implement the preprocessing elsewhere.

Reference: ``mec_hub.get_transform(model)`` (timm's eval transform) on real photos, against a
re-implementation written here with Pillow and numpy only, driven by nothing but the sidecar's
``export.preprocessing`` fields.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import mec_hub
from mec_hub.cli.hub import main as hub_main
from mec_hub.errors import MecHubError

MODEL = "mec_resnet18_cifar10s"  # the bundled model: bilinear, crop_pct 1.0, 48 px


def reimplemented(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32, from the sidecar's fields alone."""
    assert pre["image"].startswith("RGB") and pre["channel_order"] == "RGB" and pre["layout"].startswith("CHW")
    resize, crop = pre["resize"], pre["crop"]
    width, height = image.size
    if resize["mode"] == "shorter_side":
        assert resize["longer_side_rounding"] == "floor" and resize["max_size"] is None
        n = resize["shorter_side"]
        size = (n, math.floor(n * height / width)) if width <= height else (math.floor(n * width / height), n)
    elif resize["mode"] == "keep_ratio":
        assert resize["size_rounding"] == "half_even"  # Python's round()
        target_h, target_w = resize["size"]
        scale = {"min": min, "max": max}[resize["ratio"]](height / target_h, width / target_w)
        size = (round(width / scale), round(height / scale))
    else:
        assert resize["mode"] == "exact"
        size = (resize["size"][1], resize["size"][0])
    pixels = np.asarray(image.resize(size, getattr(Image.Resampling, resize["pillow_filter"])), dtype=np.uint8)

    assert crop["mode"] == "center" and crop["offset_rounding"] == "half_even"
    crop_h, crop_w = crop["size"]
    short_h, short_w = max(crop_h - pixels.shape[0], 0), max(crop_w - pixels.shape[1], 0)
    if short_h or short_w:
        padded = np.empty((pixels.shape[0] + short_h, pixels.shape[1] + short_w, 3), np.uint8)
        padded[:] = np.asarray(crop["pad_fill"], np.uint8)
        top, left = short_h // 2, short_w // 2
        padded[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        pixels = padded
    top = round((pixels.shape[0] - crop_h) / 2)
    left = round((pixels.shape[1] - crop_w) / 2)
    pixels = pixels[top : top + crop_h, left : left + crop_w]

    assert pre["to_float"]["dtype"] == "float32"
    x = pixels.astype(np.float32) / np.float32(pre["to_float"]["divide_by"])
    norm = pre["normalize"]
    x = (x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return x.transpose(2, 0, 1)


def _photos(photos_dir: Path) -> list[Image.Image]:
    paths = sorted(photos_dir.iterdir())
    assert len(paths) >= 10
    images = [Image.open(p).convert("RGB") for p in paths if p.suffix.lower() in (".jpg", ".png")]
    # Cut-outs whose longer side, scaled, ends in .6-.8: floor and round disagree there.
    return [images[0].crop((0, 0, 61, 100)), images[0].crop((0, 0, 100, 61)), *images]


def _assert_reproduces(model_or_cfg: Any, pre: dict[str, Any], photos: list[Image.Image]) -> None:
    transform = mec_hub.get_transform(model_or_cfg)
    for image in photos:
        want = transform(image).numpy()
        got = reimplemented(image, pre)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _export(weights: str | Path, out: Path) -> dict[str, Any]:
    result = CliRunner().invoke(hub_main, ["export", str(weights), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(Path(f"{out}.json").read_text())


def _other_crop_folder(tmp_path: Path) -> Path:
    """The bundled weights with another preprocessing: bicubic, crop_pct 0.875, 40 px."""
    folder = tmp_path / "other_crop"
    shutil.copytree(Path(mec_hub.__file__).parent / "bundled" / MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(interpolation="bicubic", crop_pct=0.875, input_size=[3, 40, 40])
    config["mec_hub"]["name"] = "other_crop_test"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_bundled_models_sidecar_reproduces_its_transform(tmp_path: Path, photos_dir: Path):
    side = _export(MODEL, tmp_path / "m.pt2")
    pre = side["export"]["preprocessing"]
    assert pre["resize"]["mode"] == "shorter_side" and pre["resize"]["shorter_side"] == 48  # floor(48 / 1.0)
    assert pre["resize"]["interpolation"] == "bilinear" and pre["crop"]["size"] == [48, 48]
    assert side["export"]["version"] == 2
    _assert_reproduces(mec_hub.load(MODEL), pre, _photos(photos_dir))


def test_another_crop_pct_and_interpolation_are_stated_and_reproduced(tmp_path: Path, photos_dir: Path):
    folder = _other_crop_folder(tmp_path)
    side = _export(folder, tmp_path / "m.pt2")
    pre = side["export"]["preprocessing"]
    assert pre["resize"]["shorter_side"] == 45 and pre["resize"]["interpolation"] == "bicubic"  # floor(40 / .875)
    assert pre["resize"]["pillow_filter"] == "BICUBIC" and pre["crop"]["size"] == [40, 40]
    _assert_reproduces(mec_hub.load(weights=folder), pre, _photos(photos_dir))


BASE = {"input_size": (3, 48, 48), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"input_size": (3, 40, 56), "interpolation": "bicubic", "crop_pct": 0.9},  # not square: keep_ratio
        {"crop_mode": "squash", "crop_pct": 0.9, "interpolation": "lanczos"},  # exact size
        {"crop_mode": "border", "crop_pct": 0.8},  # longer side, then padded with the mean colour
        {"crop_pct": 1.3, "interpolation": "nearest"},  # resized below the crop: padded with 0
        {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 1.0), "interpolation": "box", "crop_pct": 0.95},
    ],
)
def test_every_crop_mode_timm_builds_is_described(change: dict[str, Any], photos_dir: Path):
    from mec_hub.data.transforms import preprocessing_rule

    cfg = {**BASE, **change}
    pre = json.loads(json.dumps(preprocessing_rule(cfg)))  # as a sidecar holds it
    _assert_reproduces(cfg, pre, _photos(photos_dir)[:6])


def test_a_transform_step_it_cannot_describe_stops_the_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import timm.data

    from mec_hub.data import transforms

    real = timm.data.create_transform
    monkeypatch.setattr(timm.data, "create_transform", lambda **kw: _with_extra_step(real(**kw)))
    with pytest.raises(MecHubError, match="cannot describe"):
        transforms.preprocessing_rule(MODEL)
    result = CliRunner().invoke(hub_main, ["export", MODEL, "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert result.exit_code == 1 and "cannot describe" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def _with_extra_step(compose: Any) -> Any:
    from torchvision import transforms as tv

    return tv.Compose([tv.Grayscale(3), *compose.transforms])


def test_a_sidecar_of_version_1_without_the_steps_still_reads(tmp_path: Path):
    from mec_hub.models.export_sidecar import read_export_description

    out = tmp_path / "m.pt2"
    side = _export(MODEL, out)
    for key in ("version", "preprocessing"):
        del side["export"][key]
    Path(f"{out}.json").write_text(json.dumps(side))
    got = read_export_description(out)
    assert got.version == 1 and got.preprocessing is None and got.format == "pt2"

    side["export"].update(version=2, preprocessing={"resize": "shorter side 48"})
    Path(f"{out}.json").write_text(json.dumps(side))
    with pytest.raises(MecHubError, match=r"m\.pt2\.json: export\.preprocessing is not"):
        read_export_description(out)
