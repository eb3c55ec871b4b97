#!/usr/bin/env bash
# The bundled model's training run (from the repository root, 2-core CPU, about 57 s per epoch:
# 100 epochs in 1 h 37 min; it was killed once at epoch 33 and resumed by rerunning the command).
# Its log is metrics.jsonl beside this file. The recipe is training/configs/mec_resnet18_cifar10s.yaml;
# the command below resolves to the same options as the one that was run, before config files
# existed (tests/training/test_config.py checks that the two agree):
# As run:
#   python training/pretrain.py --data ../shared/data/cifar10-subset/train --output-dir runs/mec_resnet18_cifar10s \
#       --arch resnet18 --model-args '{"channels": [32, 64, 128, 224]}' --image-size 48 --augmentation mocov3-noblur \
#       --dim 512 --pred-dim 128 --batch-size 128 --eps2 512 --teacher-momentum 0.99 --epochs 100 --warmup-epochs 10 \
#       --lamda-warmup-epochs 10 --workers 1 --log-every 39 --knn-train ../shared/data/cifar10-subset/train \
#       --knn-val ../shared/data/cifar10-subset/test --knn-every 10 --export-name mec_resnet18_cifar10s --no-tensorboard --seed 0
set -euo pipefail
cd "$(dirname "$0")/../.."
python training/pretrain.py --config training/configs/mec_resnet18_cifar10s.yaml \
    --data ../shared/data/cifar10-subset/train --output-dir runs/mec_resnet18_cifar10s \
    --knn-train ../shared/data/cifar10-subset/train --knn-val ../shared/data/cifar10-subset/test
