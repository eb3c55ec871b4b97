"""Write the bundled model's folder (mec_hub/bundled/NAME) from the training run and its measured reports.

    python benchmarks/bundled_model/package.py runs/mec_resnet18_cifar10s

The weights are the run's student, exactly as `training/pretrain.py` exports them; the metadata
adds the numbers measured by the commands in `evaluate.sh` (the JSON reports beside this file),
so the model card and the safetensors header say what the registry record says. Prints the
SHA-256 digests to put in the record's `files` in `mec_hub/weights/zoo.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mec_hub.export.convert import extract_weights, write_hub_folder
from mec_hub.weights.checkpoint import read_checkpoint

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
NAME = "mec_resnet18_cifar10s"


METRICS_SOURCE = (
    "measured by mec-hub, seed 0: kNN (k=20, T=0.07, DINO's protocol) and the linear probe (L-BFGS on "
    "centre-crop features) by benchmarks/bundled_model/evaluate.sh; the authors' linear protocol (main_lincls.py "
    "--lars: 100 epochs, batch 4096, LARC) and fine-tuning on 1% / 10% of the labels (Barlow Twins' recipe) by "
    "benchmarks/bundled_model/evaluate_supervised.sh"
)
RECIPE_EPS2 = "eps^2 512 (--eps2 scaled: 64 x 1024 / 128, lamda as at the paper's batch of 1024; the paper's is 64)"


def top1(report: str) -> float:
    return float(json.loads((HERE / report).read_text())["results"]["top1"])


def measured_meta() -> dict[str, object]:
    return {
        "dataset": "cifar10-subset/train (5,000 CIFAR-10 images, labels unused)",
        "pretraining": "MEC on cifar10-subset/train (5,000 images, labels unused), 100 epochs, CPU",
        "knn_top1": top1("knn_trained.json"),
        "knn_top1_random_init": top1("knn_random.json"),
        "linear_top1": top1("linear_trained.json"),
        "linear_top1_random_init": top1("linear_random.json"),
        "linear_paper_top1": top1("linear_paper_trained.json"),
        "linear_paper_top1_random_init": top1("linear_paper_random.json"),
        "finetune_1pct_top1": top1("finetune1_trained.json"),
        "finetune_1pct_top1_random_init": top1("finetune1_random.json"),
        "finetune_10pct_top1": top1("finetune10_trained.json"),
        "finetune_10pct_top1_random_init": top1("finetune10_random.json"),
        "eval_data": "cifar10-subset/test (1,000 images), bank/classifiers trained on cifar10-subset/train",
        "metrics_source": METRICS_SOURCE,
        "license": "MIT (mec-hub)",
    }


def with_eps2(recipe: str) -> str:
    """The run's recipe line (written before runs named their eps^2 there) with the eps^2 it used."""
    return recipe if "eps^2" in recipe else recipe.replace(", 1/lamda warm-up", f", {RECIPE_EPS2}, 1/lamda warm-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the training run's --output-dir")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "mec_hub" / "bundled" / NAME)
    args = parser.parse_args()
    checkpoint = args.run / "checkpoint_last.pt"
    extracted = extract_weights(read_checkpoint(checkpoint), source="student", origin=str(checkpoint))
    extracted.meta["recipe"] = with_eps2(extracted.meta["recipe"])
    result = write_hub_folder(
        extracted, args.out, name=NAME, overwrite=True, origin=str(checkpoint), extra_meta=measured_meta()
    )
    for file, digest in result.digests.items():
        print(f"{file}: {digest}")


if __name__ == "__main__":
    main()
