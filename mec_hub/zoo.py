"""The published MEC models. Each entry is data only; see ``mec_hub.registry``."""

from __future__ import annotations

from mec_hub.registry import ModelRecord, Preprocessing, ProjectorSpec, register

PAPER = "Liu et al., Self-Supervised Learning via Maximum Entropy Coding, NeurIPS 2022 (arXiv:2210.11464)"

register(
    ModelRecord(
        name="mec_resnet50",
        architecture="resnet50",
        embed_dim=2048,
        # The authors' linear evaluation: Resize(256) + CenterCrop(224), bilinear, ImageNet statistics.
        preprocessing=Preprocessing(),
        # Converted with `mec-hub convert` from the authors' checkpoint; not yet published from
        # here, so no digest is known and the location must be given (MEC_HUB_MEC_RESNET50_WEIGHTS
        # or weights=...). Once pushed, pin hf_revision to the commit and fill in both digests.
        sha256=None,
        hf_repo_id="mec-hub/mec_resnet50.in1k_ep100",
        hf_revision=None,
        projector=ProjectorSpec(in_dim=2048, hidden_dim=2048, out_dim=2048),
        projector_sha256=None,
        meta={
            "pretraining": "MEC on ImageNet-1k, 100 epochs, batch 1024, SGD lr 0.5 x 1024/256, eps^2 = 64",
            "epochs": 100,
            "batch_size": 1024,
            "linear_top1": 70.8,
            "metrics_source": "the authors' figure (paper, Table 1); not measured by mec-hub",
            "source_checkpoint": "official MEC ResNet-50 100-epoch checkpoint (.pth.tar, key 'state_dict')",
            "converted_from": "student encoder (module.encoder.*), projector kept separately",
            "license": "MIT (github.com/xinliu20/MEC)",
            "paper": PAPER,
        },
    )
)
