"""Dense and intermediate features: ``mec_hub.load(..., features_only=True)`` and ``mec-embed --pool/--layer``.

References: timm's own ``features_only`` model built from the same folder (``local-dir:``), the
loaded backbone's own ``forward_features``, and the pooling formulas written out here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.embedding.checkpoint import ResumeError
from mec_hub.embedding.engine import Embedder, ModelMismatchError
from mec_hub.embedding.job import EmbeddingInterrupted
from mec_hub.errors import ChecksumMismatchError, InvalidArgumentError
from mec_hub.export.convert import ExtractedWeights, write_hub_folder
from mec_hub.models.encoder import MECEncoder, build_backbone
from mec_hub.models.features import PooledStage, feature_model
from mec_hub.weights.config import ModelConfig

STAGES = (1, 2, 3, 4)


def _batch(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_stem_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted folder of a narrow ResNet-18 with the CIFAR-style stem (3x3/1 conv, no max-pool)."""
    torch.manual_seed(3)
    args = {"channels": [16, 32, 48, 64]}
    backbone = build_backbone("resnet18", args, "small")
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    extracted = ExtractedWeights(
        architecture="resnet18",
        backbone=backbone.state_dict(),
        projector=None,
        layout="test fixture",
        model_args=args,
        stem="small",
        preprocessing={"input_size": (3, 32, 32), "crop_pct": 1.0},
        meta={},
    )
    out = tmp_path_factory.mktemp("small-stem") / "folder"
    write_hub_folder(extracted, out, name="small_stem_resnet18", overwrite=True)
    return out


def test_feature_maps_equal_timms_features_only_model_of_the_same_folder(tiny_weights_dir: Path):
    reference = timm.create_model(
        f"local-dir:{tiny_weights_dir}", features_only=True, pretrained=True, out_indices=STAGES
    ).eval()
    ours = mec_hub.load(weights=tiny_weights_dir, features_only=True, out_indices=STAGES)
    assert not ours.training
    assert ours.feature_info.channels() == reference.feature_info.channels() == [64, 128, 256, 512]
    assert ours.feature_info.reduction() == reference.feature_info.reduction() == [4, 8, 16, 32]
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(ref_state)
    assert all(torch.equal(ours_state[k], ref_state[k]) for k in ref_state)
    x = _batch(32)
    with torch.no_grad():
        got, want = ours(x), reference(x)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)  # bit-equal at fp32 on CPU
    # It carries what the pooled model carries: the preprocessing and the verified digest.
    pooled = mec_hub.load(weights=tiny_weights_dir)
    assert ours.pretrained_cfg == pooled.pretrained_cfg
    assert ours.weights_sha256 == pooled.weights_sha256 is not None


def test_default_out_indices_are_timms(tiny_weights_dir: Path):
    reference = timm.create_model(f"local-dir:{tiny_weights_dir}", features_only=True, pretrained=True).eval()
    ours = mec_hub.load(weights=tiny_weights_dir, features_only=True)
    assert ours.feature_info.module_name() == reference.feature_info.module_name()
    with torch.no_grad():
        got, want = ours(_batch(32, 2)), reference(_batch(32, 2))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_registry_model_gives_its_backbones_maps():
    """The bundled registry model: its last map is the backbone's own unpooled output."""
    encoder = mec_hub.load()
    maps = mec_hub.load(features_only=True, out_indices=(2, 4))
    x = _batch(48, 2)
    with torch.no_grad():
        last = maps(x)[-1]
        assert torch.equal(last, encoder.backbone.forward_features(x))
    assert maps.feature_info.channels() == [64, 224]  # the bundled model's half-width stages


def test_small_stem_reductions_are_the_measured_ones(small_stem_dir: Path):
    """timm's reductions assume its 7x7/2 stem and max-pool; the small stem keeps stage 1 at full size."""
    maps_model = mec_hub.load(weights=small_stem_dir, features_only=True, out_indices=(0, 1, 2, 3, 4))
    for size in (32, 40):
        with torch.no_grad():
            maps = maps_model(_batch(size, 1))
        assert maps_model.feature_info.reduction() == [size // m.shape[-1] for m in maps] == [1, 1, 2, 4, 8]
    assert maps_model.feature_info.channels() == [m.shape[1] for m in maps] == [64, 16, 32, 48, 64]
    encoder = mec_hub.load(weights=small_stem_dir)
    x = _batch(32)
    with torch.no_grad():
        assert torch.equal(maps_model(x)[-1], encoder.backbone.forward_features(x))
    stem_only = mec_hub.load(weights=small_stem_dir, features_only=True, out_indices=(0,))
    with torch.no_grad():
        assert torch.equal(stem_only(x)[0], encoder.backbone.act1(encoder.backbone.bn1(encoder.backbone.conv1(x))))


def test_features_only_weights_are_verified_as_for_load(tiny_weights_dir: Path, tmp_path: Path):
    folder = tmp_path / "tampered"
    shutil.copytree(tiny_weights_dir, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        mec_hub.load(weights=folder, features_only=True)


def test_bad_arguments_are_one_clear_error(tiny_weights_dir: Path):
    with pytest.raises(InvalidArgumentError, match=r"feature stages 0 to 4"):
        mec_hub.load(weights=tiny_weights_dir, features_only=True, out_indices=(1, 5))
    with pytest.raises(InvalidArgumentError, match="head='backbone'"):
        mec_hub.load(weights=tiny_weights_dir, features_only=True, head="projector")


def test_a_vit_goes_through_timms_getter_wrapper(tmp_path: Path):
    """The API is not ResNet-only: a ViT's maps (timm's FeatureGetterNet) equal timm's from the same weights."""
    arch, args = "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}
    torch.manual_seed(0)
    full = timm.create_model(arch, num_classes=0, **args)
    timm.models.save_for_hf(full, tmp_path / "vit", model_args=args)
    reference = timm.create_model(
        f"local-dir:{tmp_path / 'vit'}", features_only=True, pretrained=True, out_indices=(0, 2)
    )
    backbone = build_backbone(arch, args)
    backbone.load_state_dict(full.state_dict())
    config = ModelConfig(architecture=arch, num_features=48, model_args=args, input_size=(3, 32, 32))
    ours = feature_model(MECEncoder(backbone, config=config), (0, 2))
    x = _batch(32, 2)
    with torch.no_grad():
        got, want = ours(x), reference.eval()(x)
    assert ours.feature_info.channels() == [48, 48] and ours.feature_info.reduction() == [8, 8]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# --------------------------------------------------------------------------- pooled stages


def test_average_of_the_last_stage_is_todays_default_embedding(tiny_weights_dir: Path, photos_dir: Path):
    photos = sorted(photos_dir.iterdir())[:6]
    # A pooled stage runs on torch (runtime auto): compared with the default embedding run on torch too.
    default = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, runtime="torch").embed(photos)
    pooled = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, pool="avg").embed(photos)
    np.testing.assert_array_equal(pooled, default)
    explicit = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, pool="avg", layer=4).embed(photos)
    np.testing.assert_array_equal(explicit, default)


def test_gem_against_its_formula(tiny_weights_dir: Path):
    encoder = mec_hub.load(weights=tiny_weights_dir)
    reference = timm.create_model(
        f"local-dir:{tiny_weights_dir}", features_only=True, pretrained=True, out_indices=(3,)
    )
    x = _batch(32, 4)
    with torch.no_grad():
        fmap = reference.eval()(x)[0].double()
        avg = PooledStage(encoder, layer=3, pool="avg")(x)
        gem1 = PooledStage(encoder, layer=3, pool="gem", gem_p=1.0)(x)
        gem3 = PooledStage(encoder, layer=3, pool="gem", gem_p=3.0)(x)
    # GeM (Radenovic et al. 2018): f_c = (1/|X_c| sum_{x in X_c} x^p)^(1/p), on the map clamped at 1e-6.
    clamped = fmap.clamp(min=1e-6)
    want3 = (clamped**3).sum(dim=(2, 3)) / (fmap.shape[2] * fmap.shape[3])
    want3 = want3 ** (1 / 3)
    np.testing.assert_allclose(gem3.double().numpy(), want3.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(avg.double().numpy(), fmap.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gem1.numpy(), avg.numpy(), rtol=0, atol=2e-6)  # p=1 is the mean (up to the clamp)
    assert not torch.allclose(gem3, avg)


def test_pool_none_rows_are_the_flattened_maps(tiny_weights_dir: Path):
    reference = timm.create_model(
        f"local-dir:{tiny_weights_dir}", features_only=True, pretrained=True, out_indices=(2,)
    )
    x = _batch(32, 3)
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, pool="none", layer=2, optimize=False)
    with torch.no_grad():
        fmap = reference.eval()(x)[0]
    assert embedder.embed_dim == 128 * 4 * 4
    rows = embedder.embed(x)
    # The embedder runs channels-last, the reference NCHW: other convolution kernels, float rounding apart.
    np.testing.assert_allclose(rows, fmap.reshape(3, -1).numpy(), rtol=1e-4, atol=1e-4)
    assert embedder.identity.pooling == {"layer": 2, "pool": "none", "map_shape": [128, 4, 4]}


def test_cli_pool_none_needs_float16_or_allow_large_and_prints_the_size(tiny_weights_dir: Path, tmp_path: Path):
    from tests.support.embedding import make_images

    images = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "maps.npy"
    base = [str(tmp_path / "imgs"), "--out", str(out), "--weights", str(tiny_weights_dir), "-j", "0", "--device", "cpu"]
    refused = CliRunner().invoke(embed_main, [*base, "--pool", "none", "--layer", "3"])
    assert refused.exit_code == 2 and "--out-dtype float16" in refused.output and not out.exists()
    done = CliRunner().invoke(embed_main, [*base, "--pool", "none", "--layer", "3", "--out-dtype", "float16"])
    assert done.exit_code == 0, done.output
    size = len(images) * 256 * 2 * 2 * 2  # 5 maps of 256 x 2 x 2 float16
    assert f"5 maps of 256 x 2 x 2 float16 = {size / 1e6:.1f} MB" in done.output
    meta = json.loads(out.with_name("maps.meta.json").read_text())
    assert meta["shape"] == [5, 1024] and meta["pooling"] == {"layer": 3, "pool": "none", "map_shape": [256, 2, 2]}
    maps = np.load(out).reshape(5, 256, 2, 2)
    reference = timm.create_model(
        f"local-dir:{tiny_weights_dir}", features_only=True, pretrained=True, out_indices=(3,)
    )
    transform = mec_hub.get_transform(mec_hub.load(weights=tiny_weights_dir))
    from PIL import Image

    names = out.with_name("maps.paths.txt").read_text().split()
    with Image.open(tmp_path / "imgs" / names[0]) as image:
        x = transform(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        want = reference.eval()(x)[0][0].numpy().astype(np.float16)
    np.testing.assert_allclose(maps[0].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    clash = CliRunner().invoke(embed_main, [*base, "--pool", "avg", "--head", "projector", "--overwrite"])
    assert clash.exit_code == 2 and "--head projector" in clash.output


def test_resume_refuses_another_pooling(tiny_weights_dir: Path, tmp_path: Path):
    from tests.support.embedding import make_images

    make_images(tmp_path / "imgs", 9)
    out = tmp_path / "f.npy"

    def stop(progress):
        raise KeyboardInterrupt

    gem = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, batch_size=4, pool="gem", layer=3)
    with pytest.raises(EmbeddingInterrupted):
        gem.embed_folder(tmp_path / "imgs", out, on_commit=stop)
    other_p = Embedder(
        weights=tiny_weights_dir, device="cpu", num_workers=0, batch_size=4, pool="gem", layer=3, gem_p=4
    )
    with pytest.raises(ResumeError, match="pooling"):
        other_p.embed_folder(tmp_path / "imgs", out, resume=True)
    result = gem.embed_folder(tmp_path / "imgs", out, resume=True)
    assert result.meta["pooling"] == {"layer": 3, "pool": "gem", "gem_p": 3.0}
    np.testing.assert_array_equal(np.load(out), gem.embed(sorted((tmp_path / "imgs").iterdir())))


def test_from_meta_rebuilds_the_pooling_and_checks_it(tiny_weights_dir: Path, tmp_path: Path):
    """What mec-hub search does with a feature file: rebuild its model, and refuse another one."""
    from tests.support.embedding import make_images

    make_images(tmp_path / "imgs", 3)
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, pool="gem", layer=2, gem_p=2.5)
    result = embedder.embed_folder(tmp_path / "imgs", tmp_path / "f.npy")
    rebuilt = Embedder.from_meta(result.meta_path, device="cpu", num_workers=0)
    assert rebuilt.identity.pooling == {"layer": 2, "pool": "gem", "gem_p": 2.5}
    np.testing.assert_array_equal(rebuilt.embed(_batch(32, 2)), embedder.embed(_batch(32, 2)))
    with pytest.raises(ModelMismatchError, match="pooling"):
        Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0, pool="gem", layer=3).check_matches(result.meta)
    with pytest.raises(ModelMismatchError, match="pooling"):
        Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0).check_matches(result.meta)
