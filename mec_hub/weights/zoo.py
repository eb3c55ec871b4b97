"""The published MEC models, as data: ``mec_hub.weights.registry`` registers each of ``PUBLISHED``.

Adding a model is adding a record here; this module imports only the two types records are made of.
"""

from __future__ import annotations

from mec_hub.weights.config import MODEL_FILE, PROJECTOR_FILE, ModelConfig
from mec_hub.weights.record import ModelRecord

PAPER = "Liu et al., Self-Supervised Learning via Maximum Entropy Coding, NeurIPS 2022 (arXiv:2210.11464)"

MEC_RESNET50 = ModelRecord(
    ModelConfig(
        name="mec_resnet50",
        architecture="resnet50",
        num_features=2048,
        # The authors' linear evaluation: Resize(256) + CenterCrop(224), bilinear, ImageNet
        # statistics: ModelConfig's defaults.
        projector=(2048, 2048, 2048),
        # Converted with `mec-hub convert` from the authors' checkpoint; not yet published from
        # here, so no digest is known and the location must be given (MEC_HUB_MEC_RESNET50_WEIGHTS
        # or weights=...). Once pushed, pin hf_revision to the commit and fill in both digests.
        files={},
        meta={
            "pretraining": "MEC on ImageNet-1k, 100 epochs, batch 1024, SGD lr 0.5 x 1024/256, eps^2 = 64",
            "epochs": 100,
            "batch_size": 1024,
            # The authors' linear protocol (their main_lincls.py --lars) on ImageNet-1k val.
            "linear_paper_top1": 70.8,
            "eval_data": "ImageNet-1k val (50,000 images), classifier trained on ImageNet-1k train",
            "metrics_source": (
                "the authors' repository README (github.com/xinliu20/MEC, 'Models and Logs'): 70.8 top-1 for this "
                "100-epoch checkpoint, which it says is slightly above the paper's 100-epoch result; not measured "
                "by mec-hub"
            ),
            "metrics_source_url": "https://github.com/xinliu20/MEC#models-and-logs",
            "source_checkpoint": "official MEC ResNet-50 100-epoch checkpoint (.pth.tar, key 'state_dict')",
            "converted_from": "student encoder (module.encoder.*), projector kept separately",
            "license": "MIT (github.com/xinliu20/MEC)",
            "paper": PAPER,
        },
    ),
    hf_repo_id="mec-hub/mec_resnet50.in1k_ep100",
    hf_revision=None,
)

MEC_RESNET18_CIFAR10S = ModelRecord(
    ModelConfig(
        name="mec_resnet18_cifar10s",
        # timm's resnet18 with half the channels (2.4 M parameters, 9.5 MB) and its default stem,
        # so that plain timm loads it too; trained at 48 px, where the 7x7/2 stem still sees enough.
        architecture="resnet18",
        model_args={"channels": [32, 64, 128, 224]},
        num_features=224,
        input_size=(3, 48, 48),
        crop_pct=1.0,
        projector=(224, 224, 512),
        files={
            MODEL_FILE: "c90a1ef2939732424fbf9b3ba779c8dda2cad31e014b6c57d6670f185a0ad282",
            PROJECTOR_FILE: "54e1615739a395533fbcaf3e25c14c46aba6f793cb584f8d5ed766a66e0a694c",
        },
        meta={
            "pretraining": "MEC on cifar10-subset/train (5,000 CIFAR-10 images, labels unused), 100 epochs, 2-core CPU",
            "epochs": 100,
            "batch_size": 128,
            "recipe": (
                "SGD momentum 0.9, lr 0.5 x 128/256 (10-epoch warm-up, cosine), wd 1e-5, eps^2 512 (--eps2 scaled: "
                "64 x 1024 / 128, lamda as at the paper's batch of 1024; the paper's is 64), order 4, "
                "1/lamda warm-up x8 over 10 epochs, EMA teacher 0.99 -> 1, projector 224-224-512, predictor "
                "hidden 128, MoCo v3 augmentations without blur at 48 px"
            ),
            "command": "benchmarks/bundled_model/command.sh",
            "knn_top1": 40.9,
            "knn_top1_random_init": 25.6,
            # mec-hub's fast probe (L-BFGS on centre-crop features), not the authors' protocol:
            "linear_top1": 48.4,
            "linear_top1_random_init": 29.2,
            # The authors' linear protocol at its full settings (100 epochs, batch 4096: 200 steps on 5,000 images).
            "linear_paper_top1": 31.9,
            "linear_paper_top1_random_init": 21.7,
            # Fine-tuned on 1% / 10% of cifar10-subset/train's labels (Barlow Twins' recipe).
            "finetune_1pct_top1": 30.1,
            "finetune_1pct_top1_random_init": 17.1,
            "finetune_10pct_top1": 41.2,
            "finetune_10pct_top1_random_init": 27.1,
            "eval_data": "cifar10-subset/test (1,000 images), bank/classifiers trained on cifar10-subset/train",
            "metrics_source": (
                "measured by mec-hub, seed 0: kNN (k=20, T=0.07, DINO's protocol) and the linear probe (L-BFGS on "
                "centre-crop features) by benchmarks/bundled_model/evaluate.sh; the authors' linear protocol "
                "(main_lincls.py --lars: 100 epochs, batch 4096, LARC) and fine-tuning on 1% / 10% of the labels "
                "(Barlow Twins' recipe) by benchmarks/bundled_model/evaluate_supervised.sh"
            ),
            "source_checkpoint": "runs/mec_resnet18_cifar10s/checkpoint_last.pt (student)",
            "license": "MIT (mec-hub)",
            "paper": PAPER,
        },
    ),
    # Ships inside the package (mec_hub/bundled/), written by benchmarks/bundled_model/package.py.
    bundled="mec_resnet18_cifar10s",
)

PUBLISHED = (MEC_RESNET50, MEC_RESNET18_CIFAR10S)
