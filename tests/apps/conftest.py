"""Fixtures of the tests of mec_hub.apps."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import mec_hub
from tests.support.browser import chromium, serving


@pytest.fixture(scope="module")
def indexed(cifar_dir: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FEATS.npy/.paths.txt/.meta.json as mec-embed writes them, made here by a direct forward."""
    root = tmp_path_factory.mktemp("search")
    images = root / "images"
    for cls in ("cat", "ship", "truck"):
        (images / cls).mkdir(parents=True)
        for src in sorted((cifar_dir / "train" / cls).iterdir())[:3]:
            shutil.copy(src, images / cls / src.name)
    names = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    model = mec_hub.load(weights=tiny_weights_dir)
    transform = mec_hub.get_transform(model)
    with torch.no_grad():
        feats = model(torch.stack([transform(Image.open(images / n).convert("RGB")) for n in names]))
    feats = torch.nn.functional.normalize(feats, dim=1).numpy().astype(np.float16)
    np.save(root / "FEATS.npy", feats)
    (root / "FEATS.paths.txt").write_text("".join(n + "\n" for n in names))
    meta = {
        "model": None,
        "weights": str(tiny_weights_dir),
        "weights_sha256": hashlib.sha256((tiny_weights_dir / "model.safetensors").read_bytes()).hexdigest(),
        "head": "backbone",
        "embed_dim": int(feats.shape[1]),
        "normalize": True,
        "precision": "fp32",
        "out_dtype": "float16",
        "preprocessing": model.pretrained_cfg,
        "inputs": [str(images)],
    }
    (root / "FEATS.meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def served_photos(photos_dir: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The shipped photos embedded (as mec-embed does) and served by ``mec-hub serve``'s app on
    127.0.0.1: ``url``, ``paths`` (row order) and ``matrix`` (the features, as written)."""
    pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
    from mec_hub.apps import serve
    from mec_hub.data.featurefile import FeatureFile
    from mec_hub.embedding.engine import Embedder

    root = tmp_path_factory.mktemp("served-photos")
    out = root / "feats.npy"
    Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0).embed_folder(photos_dir, out, progress=False)
    app = serve.create_app(serve.NeighbourBrowser(FeatureFile.open(out), device="cpu"))
    with serving(app) as url:
        yield SimpleNamespace(url=url, paths=(root / "feats.paths.txt").read_text().splitlines(), matrix=np.load(out))


@pytest.fixture()
def driver(tmp_path: Path):
    """Headless Chromium (skips when it is not installed); ``window.__problems`` lists script errors."""
    with chromium(tmp_path / "profile") as browser:
        yield browser
