"""The model card (``README.md``) written beside converted weights."""

from __future__ import annotations

from mec_hub.weights.config import ModelConfig

_META_LABELS = {
    "pretraining": "Pretraining",
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "linear_top1": "Linear top-1 (%)",
    "knn_top1": "kNN top-1 (%)",
    "knn_top1_random_init": "kNN top-1, same architecture with random weights (%)",
    "metrics_source": "Where the numbers come from",
    "recipe": "Recipe",
    "command": "Command",
    "source_checkpoint": "Source checkpoint",
    "converted_from": "Converted from",
    "license": "License",
    "paper": "Paper",
}


def render_model_card(config: ModelConfig, *, layout: str) -> str:
    name = config.name or f"mec_{config.architecture}"
    license_id = str(config.meta.get("license", "other")).split(" ")[0].lower()
    lines = [
        "---",
        "library_name: timm",
        f"license: {license_id}",
        "tags: [image-feature-extraction, timm, mec, self-supervised-learning, safetensors]",
        "---",
        f"# {name}",
        "",
        f"Maximum Entropy Coding (MEC) {config.architecture} backbone, headless "
        f"({config.num_features}-d pooled features), converted by `mec-hub convert` from a {layout}.",
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
    lines += [f"- **{label}**: {config.meta[key]}" for key, label in _META_LABELS.items() if key in config.meta]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import mec_hub",
        "model = mec_hub.load(weights='hf-hub:ORG/NAME')  # or a local folder",
        "transform = mec_hub.get_transform(model)",
        "",
        "import timm  # without mec-hub",
        "model = timm.create_model('hf-hub:ORG/NAME', pretrained=True)",
        "```",
        "",
    ]
    return "\n".join(lines)
