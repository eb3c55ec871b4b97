"""Training data: image discovery, the MoCo v3 views, per-sample determinism, the global-batch sampler."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms

from mec_hub.data.datasets import GlobalBatchSampler
from training.data import GaussianBlur, TwoViewImages, find_images, mocov3_views


def write_images(root: Path, count: int = 6, size: int = 40) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / ("a" if i % 2 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths


def test_find_images_is_recursive_sorted_and_skips_other_files(tmp_path):
    write_images(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "UPPER.JPG")
    assert find_images(tmp_path) == ["a/01.png", "a/03.png", "a/UPPER.JPG", "b/00.png", "b/02.png"]


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        find_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"no images under {tmp_path}"):
        find_images(tmp_path)


def test_views_follow_the_official_mocov3_recipe():
    view1, view2 = mocov3_views(96)
    for view, blur_p, solarize_p in ((view1, 1.0, None), (view2, 0.1, 0.2)):
        steps = view.transforms
        crop = steps[0]
        assert isinstance(crop, transforms.RandomResizedCrop)
        assert crop.size == (96, 96) and crop.scale == (0.2, 1.0)
        jitter = steps[1]
        assert jitter.p == 0.8
        cj = jitter.transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert isinstance(steps[2], transforms.RandomGrayscale) and steps[2].p == 0.2
        blur = steps[3]
        assert blur.p == blur_p and isinstance(blur.transforms[0], GaussianBlur)
        assert blur.transforms[0].sigma == (0.1, 2.0)
        solarize = [s for s in steps if isinstance(s, transforms.RandomSolarize)]
        assert [(s.threshold, s.p) for s in solarize] == ([] if solarize_p is None else [(128, solarize_p)])
        assert isinstance(steps[-3], transforms.RandomHorizontalFlip)
        normalize = steps[-1]
        assert tuple(normalize.mean) == (0.485, 0.456, 0.406) and tuple(normalize.std) == (0.229, 0.224, 0.225)


def test_noblur_views_drop_only_the_blur():
    blurred, plain = mocov3_views(32), mocov3_views(32, "mocov3-noblur")
    for with_blur, without in zip(blurred, plain, strict=True):
        kept = [
            s
            for s in with_blur.transforms
            if not (isinstance(s, transforms.RandomApply) and isinstance(s.transforms[0], GaussianBlur))
        ]
        assert [repr(s) for s in without.transforms] == [repr(s) for s in kept]
    with pytest.raises(ValueError, match="augmentation must be one of"):
        mocov3_views(32, "strong")


def test_blur_and_solarize_are_the_pil_operations():
    image = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8"))
    solarize = transforms.RandomSolarize(threshold=128, p=1.0)
    assert np.array_equal(np.asarray(solarize(image)), np.asarray(ImageOps.solarize(image, 128)))
    torch.manual_seed(3)
    blurred = GaussianBlur()(image)
    torch.manual_seed(3)
    sigma = float(torch.empty(()).uniform_(0.1, 2.0))
    from PIL import ImageFilter

    assert np.array_equal(np.asarray(blurred), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma))))


def test_solarize_draws_its_coin_from_torch_so_a_seed_fixes_it():
    image = Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype("uint8"))
    solarized = np.asarray(ImageOps.solarize(image, 128))
    view = mocov3_views(16)[1]
    solarize = next(s for s in view.transforms if isinstance(s, transforms.RandomSolarize))
    applied = []
    for seed in range(40):
        torch.manual_seed(seed)
        out = np.asarray(solarize(image))
        torch.manual_seed(seed)
        expected = solarized if float(torch.rand(1)) < 0.2 else np.asarray(image)  # one draw, p = 0.2
        assert np.array_equal(out, expected), seed
        applied.append(np.array_equal(out, solarized))
    assert 0 < sum(applied) < len(applied)


def test_a_sample_is_a_function_of_seed_epoch_and_index_only(tmp_path):
    write_images(tmp_path)
    dataset = TwoViewImages(tmp_path, mocov3_views(32), seed=7)
    first = dataset[(2, 3)]
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    state = torch.get_rng_state()
    again = TwoViewImages(tmp_path, mocov3_views(32), seed=7)[(2, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be changed
    for a, b in zip(first, again, strict=True):
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # two different views
    assert not torch.equal(first[0], dataset[(3, 3)][0])  # another epoch
    assert not torch.equal(first[0], TwoViewImages(tmp_path, mocov3_views(32), seed=8)[(2, 3)][0])


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    write_images(tmp_path)
    dataset = TwoViewImages(tmp_path, mocov3_views(32), seed=0)
    batches = []
    for workers in (0, 2):
        sampler = GlobalBatchSampler(len(dataset), 2, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        batches.append([torch.cat(views) for views in loader])
    assert len(batches[0]) == 3
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a, b)


def test_unreadable_images_are_replaced_by_the_next_one_with_a_warning(tmp_path):
    paths = write_images(tmp_path, 3)
    paths[0].write_bytes(b"not a png")
    dataset = TwoViewImages(tmp_path, (transforms.ToTensor(), transforms.ToTensor()))
    broken = dataset.files.index("b/00.png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*00.png"):
        views = dataset[(0, broken)]
    expected = transforms.ToTensor()(Image.open(tmp_path / dataset.files[broken + 1]).convert("RGB"))
    assert torch.equal(views[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[(1, broken)]  # warned once per file


def test_global_batches_are_the_same_for_any_number_of_ranks():
    n, batch = 50, 8
    single = GlobalBatchSampler(n, batch, seed=3)
    single.set_epoch(4)
    expected = list(single)
    assert len(expected) == n // batch  # the incomplete last batch is dropped
    for world in (2, 4):
        shards = []
        for rank in range(world):
            sampler = GlobalBatchSampler(n, batch, rank=rank, world_size=world, seed=3)
            sampler.set_epoch(4)
            shards.append(list(sampler))
        joined = [[pair for r in range(world) for pair in shards[r][s]] for s in range(len(expected))]
        assert joined == expected
    indices = [i for b in expected for _, i in b]
    assert len(set(indices)) == len(indices) and all(e == 4 for b in expected for e, _ in b)


def test_epochs_are_different_permutations_and_resume_mid_epoch():
    sampler = GlobalBatchSampler(40, 4, seed=0)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for b in epoch0 for _, i in b] != [i for b in epoch1 for _, i in b]
    sampler.set_epoch(1, start_step=6)
    assert len(sampler) == 4 and list(sampler) == epoch1[6:]


def test_sampler_refuses_impossible_settings():
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(100, 10, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        GlobalBatchSampler(5, 8)
