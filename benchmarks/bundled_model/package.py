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

from mec_hub.export.convert import extract_weights, read_checkpoint, write_hub_folder

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
NAME = "mec_resnet18_cifar10s"


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
        "eval_data": "cifar10-subset/test (1,000 images), bank/probe trained on cifar10-subset/train",
        "metrics_source": (
            "measured by mec-hub: kNN k=20 T=0.07 (DINO protocol) and linear probe, seed 0, "
            "commands in benchmarks/bundled_model/evaluate.sh"
        ),
        "license": "MIT (mec-hub)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the training run's --output-dir")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "mec_hub" / "bundled" / NAME)
    args = parser.parse_args()
    checkpoint = args.run / "checkpoint_last.pt"
    extracted = extract_weights(read_checkpoint(checkpoint), source="student", origin=str(checkpoint))
    result = write_hub_folder(
        extracted, args.out, name=NAME, overwrite=True, origin=str(checkpoint), extra_meta=measured_meta()
    )
    for file, digest in result.digests.items():
        print(f"{file}: {digest}")


if __name__ == "__main__":
    main()
