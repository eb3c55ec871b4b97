"""The model card (``README.md``) written beside converted weights, with huggingface_hub's ``ModelCard``.

The card's metadata is what the Hub reads: ``library_name: timm`` (so the Hub offers timm's
loading snippet), ``license``, ``tags``, ``pipeline_tag``, the pretraining ``datasets`` and a
``model-index`` holding the top-1 figures of ``config.meta``, each named with its protocol (the Hub
shows them on the model page), and the source of the figures. All of it comes from the
``ModelConfig`` alone, so the card of a folder can be written again from its ``config.json``.

The license is the first word of ``meta["license"]`` (``other`` when none is recorded), and the card
says beside it that the training data's own terms apply to the weights' use. The Hub repo is not
known before a push: the card names it ``ORG/NAME`` (``REPO_PLACEHOLDER``), which ``mec-hub push``
fills with the repo id it pushes to (``for_repo``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mec_hub.weights.config import ModelConfig

TAGS = ["image-feature-extraction", "timm", "mec", "self-supervised-learning", "safetensors"]
PIPELINE_TAG = "image-feature-extraction"
# Licenses the Hub knows by these ids (the first word of ``meta["license"]``, lower-cased).
HUB_LICENSES = {"mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "cc0-1.0"}
# Hub dataset ids recognised in the free-text meta (``dataset``, ``pretraining``, ``eval_data``).
_DATASETS = (
    (re.compile(r"imagenet", re.IGNORECASE), "imagenet-1k", "ImageNet-1k"),
    (re.compile(r"cifar[-_ ]?100", re.IGNORECASE), "cifar100", "CIFAR-100"),
    (re.compile(r"cifar[-_ ]?10(?!\d)", re.IGNORECASE), "cifar10", "CIFAR-10"),
)
# The terms of each recognised data set and where they are stated (Hub id -> "... apply").
_CIFAR_TERMS = (
    "its page (https://www.cs.toronto.edu/~kriz/cifar.html) states no license; any terms its authors set apply"
)
DATA_TERMS = {
    "imagenet-1k": "ImageNet's terms of access (https://image-net.org/download) apply",
    "cifar100": _CIFAR_TERMS,
    "cifar10": _CIFAR_TERMS,
}
# The Hub repo in a card written before it is pushed; ``for_repo`` puts the repo id in its place.
REPO_PLACEHOLDER = "ORG/NAME"
# meta key -> metric name in the model-index: each key is one protocol's top-1 accuracy, in percent, and
# the name says which (the model-index groups results by task and dataset, so the protocol lives in the name).
METRICS = {
    "knn_top1": "kNN top-1 (%)",
    "linear_top1": "Linear probe top-1 (%)",
    "linear_paper_top1": "Linear top-1 (%), the authors' protocol",
    "finetune_1pct_top1": "Top-1 (%), fine-tuned on 1% of the labels",
    "finetune_10pct_top1": "Top-1 (%), fine-tuned on 10% of the labels",
}
_STANDARD_RESNET = re.compile(r"resnet(18|34|50|101|152)|wide_resnet(50|101)_2|resnext(50_32x4d|101_32x8d)")
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})", re.IGNORECASE)

_META_LABELS = {
    "pretraining": "Pretraining",
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "linear_paper_top1": (
        "Linear top-1 (%), the authors' protocol (their main_lincls.py with --lars: frozen backbone, "
        "BatchNorm + fc, SGD in LARC, lr 0.03 x batch/256, batch 4096, 100 epochs; `mec-hub eval linear "
        "--protocol paper`)"
    ),
    "linear_paper_top1_random_init": "Linear top-1, the authors' protocol, same architecture with random weights (%)",
    "linear_top1": (
        "Linear probe top-1 (%) (mec-hub's fast probe: L-BFGS logistic regression on standardised centre-crop "
        "features, weight decay chosen on 20% held out; `mec-hub eval linear`)"
    ),
    "linear_top1_random_init": "Linear probe top-1, same architecture with random weights (%)",
    "knn_top1": "kNN top-1 (%) (weighted kNN: cosine, k=20, T=0.07, DINO's protocol; `mec-hub eval knn`)",
    "knn_top1_random_init": "kNN top-1, same architecture with random weights (%)",
    "finetune_1pct_top1": (
        "Top-1 (%) fine-tuned on 1% of the labels (whole network, Barlow Twins' recipe: 20 epochs, batch 256, "
        "SGD lr 0.002 backbone / 0.5 head, cosine; `mec-hub eval finetune --labels-fraction 0.01`)"
    ),
    "finetune_10pct_top1": (
        "Top-1 (%) fine-tuned on 10% of the labels (the same recipe; `mec-hub eval finetune --labels-fraction 0.1`)"
    ),
    "finetune_1pct_top1_random_init": "Top-1 fine-tuned on 1% of the labels, from random weights (%)",
    "finetune_10pct_top1_random_init": "Top-1 fine-tuned on 10% of the labels, from random weights (%)",
    "eval_data": "Evaluated on",
    "metrics_source": "Where the numbers come from",
    "recipe": "Recipe",
    "command": "Command",
    "source_checkpoint": "Source checkpoint",
    "converted_from": "Converted from",
    "paper": "Paper",
}


def _hub_dataset(text: Any) -> tuple[str, str] | None:
    """(Hub id, pretty name) of the dataset a free-text description names, if one is recognised."""
    for pattern, hub_id, pretty in _DATASETS:
        if isinstance(text, str) and pattern.search(text):
            return hub_id, pretty
    return None


def _license(meta: Mapping[str, Any]) -> str:
    first = str(meta.get("license", "other")).split(" ")[0].lower()
    return first if first in HUB_LICENSES else "other"


def _label(key: str, meta: Mapping[str, Any]) -> str:
    """A Details label; a figure measured with other settings than the usual names them (``KEY_protocol``)."""
    protocol = meta.get(f"{key}_protocol")
    return f"{METRICS[key]} ({protocol})" if key in METRICS and protocol else _META_LABELS[key]


def _license_lines(meta: Mapping[str, Any]) -> list[str]:
    """The license, and the training data whose own terms apply to the use of the weights as well."""
    stated = meta.get("license")
    if not stated:
        words = "No license is recorded for these weights (`license: other`)."
    elif _license(meta) == "other":
        words = f"{stated} (not a license id the Hub knows: `license: other`)."
    else:
        words = f"{stated}."
    lines = ["## License", "", words]
    data = meta.get("dataset")
    known = _hub_dataset(meta.get("dataset")) or _hub_dataset(meta.get("pretraining"))
    if known is not None:
        lines += ["", f"Trained on {known[1]}: {DATA_TERMS[known[0]]} to the use of these weights as well."]
    elif data:
        lines += ["", f"Trained on {data}: the data's own terms apply to the use of these weights as well."]
    return [*lines, ""]


def _source_url(meta: Mapping[str, Any]) -> str | None:
    """Where the numbers can be checked: ``metrics_source_url``, or the paper when the numbers are the paper's."""
    if meta.get("metrics_source_url"):
        return str(meta["metrics_source_url"])
    source = str(meta.get("metrics_source", ""))
    arxiv = _ARXIV.search(source) or ("paper" in source.lower() and _ARXIV.search(str(meta.get("paper", ""))))
    return f"https://arxiv.org/abs/{arxiv.group(1)}" if arxiv else None


def eval_results(config: ModelConfig) -> list[EvalResult]:
    """The measured top-1 numbers of ``config.meta`` as model-index entries, with their data and source."""
    meta = config.meta
    found = [(key, meta[key]) for key in METRICS if isinstance(meta.get(key), int | float)]
    if not found:
        return []
    eval_data = meta.get("eval_data")
    dataset = _hub_dataset(eval_data) or _hub_dataset(meta.get("dataset")) or _hub_dataset(meta.get("pretraining"))
    hub_id, pretty = dataset or ("custom", "custom data")
    split = re.search(r"\b(test|val|validation)\b", str(eval_data or ""))
    source = meta.get("metrics_source")
    url = _source_url(meta)
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image classification",
            dataset_type=hub_id,
            dataset_name=str(eval_data or pretty),
            dataset_split=None if split is None else ("test" if split.group(1) == "test" else "validation"),
            metric_type="accuracy",
            metric_name=METRICS[key],
            metric_value=value,
            source_name=str(source) if source and url else None,
            source_url=url if source else None,
        )
        for key, value in found
    ]


def card_data(config: ModelConfig) -> ModelCardData:
    """The card's metadata (the YAML header the Hub reads)."""
    meta = config.meta
    datasets = meta.get("datasets")
    if datasets is None:
        pretraining = _hub_dataset(meta.get("dataset")) or _hub_dataset(meta.get("pretraining"))
        datasets = [pretraining[0]] if pretraining else None
    return ModelCardData(
        library_name="timm",
        license=_license(meta),
        tags=list(TAGS),
        pipeline_tag=PIPELINE_TAG,
        datasets=list(datasets) if datasets else None,
        model_name=config.name or f"mec_{config.architecture}",
        eval_results=eval_results(config) or None,
    )


def _body(config: ModelConfig, *, layout: str) -> list[str]:
    name = config.name or f"mec_{config.architecture}"
    lines = [
        f"# {name}",
        "",
        f"Maximum Entropy Coding (MEC) {config.architecture} backbone, headless "
        f"({config.num_features}-d pooled features), converted by `mec-hub convert` from "
        f"{'an' if layout[:1].lower() in 'aeiou' else 'a'} {layout}.",
        "",
        "## Files",
        "",
        "| file | SHA-256 |",
        "|---|---|",
    ]
    lines += [f"| `{fname}` | `{digest}` |" for fname, digest in sorted(config.files.items())]
    if config.projector is not None:
        in_dim, hidden_dim, out_dim = config.projector
        lines += [
            "",
            f"`projector.safetensors`: the MEC projector {in_dim} -> {hidden_dim} -> {out_dim} "
            "(Linear-BN-ReLU x2, Linear, BatchNorm without affine).",
        ]
    lines += [
        "",
        "## Preprocessing",
        "",
        f"input {config.input_size[1]}x{config.input_size[2]}, resize {config.interpolation} with crop_pct "
        f"{config.crop_pct} ({config.crop_mode} crop), mean {list(config.mean)}, std {list(config.std)}.",
        "",
        "## Details",
        "",
    ]
    lines += [f"- **{_label(key, config.meta)}**: {config.meta[key]}" for key in _META_LABELS if key in config.meta]
    lines += ["", *_license_lines(config.meta)]
    repo = REPO_PLACEHOLDER
    lines += [
        "## Usage",
        "",
        "```python",
        "import mec_hub",
        f"model = mec_hub.load(weights='hf-hub:{repo}')  # or a local folder",
        "transform = mec_hub.get_transform(model)",
        "",
        "import timm  # without mec-hub",
        f"model = timm.create_model('hf-hub:{repo}', pretrained=True)",
        "```",
        "",
    ]
    if _transfers(config):
        lines += [
            f"For detection: `mec-hub convert hf-hub:{repo} --to detectron2 --out model.pkl` (Detectron2's "
            "MODEL.WEIGHTS) or `--to torchvision --out model.pth` (torchvision, MMDetection).",
            "",
        ]
    return lines


def _transfers(config: ModelConfig) -> bool:
    """Whether Detectron2 and torchvision build this backbone (a standard ResNet of theirs)."""
    return bool(_STANDARD_RESNET.fullmatch(config.architecture)) and not config.model_args and config.stem == "default"


def model_card(config: ModelConfig, *, layout: str) -> ModelCard:
    """The card of the folder ``config`` describes (``layout``: what it was converted from)."""
    header = card_data(config).to_yaml()
    return ModelCard("\n".join(["---", header, "---", *_body(config, layout=layout)]))


def render_model_card(config: ModelConfig, *, layout: str) -> str:
    """The ``README.md`` text."""
    return str(model_card(config, layout=layout))


def for_repo(card_text: str, repo_id: str) -> str:
    """The card as pushed to ``repo_id``: every ``REPO_PLACEHOLDER`` replaced by the repo id."""
    return card_text.replace(REPO_PLACEHOLDER, repo_id)
