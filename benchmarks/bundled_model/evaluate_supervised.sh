#!/usr/bin/env bash
# The bundled model under the protocols that train on images (README zoo table, benchmarks/RESULTS.md):
# the authors' linear protocol at its full settings (100 epochs, batch 4096, LARC) and semi-supervised
# fine-tuning (Barlow Twins' recipe: 20 epochs, batch 256) on 1% and 10% of cifar10-subset/train's labels,
# each for the trained weights and for the same architecture with random weights (seed 0).
# Run from anywhere after `pip install -e .`; writes the JSON reports beside this file. Runs resume:
# rerun after an interruption (RUNS keeps the checkpoints; default a folder under /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=benchmarks/bundled_model
DATA=../shared/data/cifar10-subset
RUNS=${RUNS:-/tmp/mec_bundled_supervised}
COMMON=(--model mec_resnet18_cifar10s --train $DATA/train --val $DATA/test --device cpu --num-workers 1 --seed 0)
for which in trained random; do
    init=(); [ $which = random ] && init=(--random-init)
    for percent in 1 10; do
        fraction=$(python3 -c "print($percent / 100)")
        mec-hub eval finetune "${COMMON[@]}" "${init[@]}" --labels-fraction "$fraction" \
            --output-dir "$RUNS/finetune${percent}_$which" --out $B/finetune${percent}_$which.json
    done
    mec-hub eval linear --protocol paper "${COMMON[@]}" "${init[@]}" \
        --output-dir "$RUNS/linear_paper_$which" --out $B/linear_paper_$which.json
done
