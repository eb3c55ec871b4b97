#!/usr/bin/env bash
# The bundled model's numbers (README zoo table, its registry record): kNN and linear probe on
# cifar10-subset, trained weights against the same architecture with random weights (seed 0).
# Run from anywhere after `pip install -e .`; writes the JSON reports and curves.png beside this file.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=benchmarks/bundled_model
DATA=../shared/data/cifar10-subset
FEATS=$(mktemp -d)
trap 'rm -rf "$FEATS"' EXIT
mec-hub eval knn --model mec_resnet18_cifar10s --train $DATA/train --val $DATA/test \
    --out $B/knn_trained.json --save-features "$FEATS/trained"
mec-hub eval knn --model mec_resnet18_cifar10s --random-init --seed 0 --train $DATA/train --val $DATA/test \
    --out $B/knn_random.json --save-features "$FEATS/random"
for which in trained random; do
    mec-hub eval linear --train-features "$FEATS/$which/train.npy" --val-features "$FEATS/$which/val.npy" \
        --seed 0 --out $B/linear_$which.json
done
mec-hub plot $B/metrics.jsonl --out $B/curves.png
