#!/usr/bin/env bash
# The evaluation issue's acceptance: a 1-epoch pretraining run, then every evaluation and the
# random-init floor; the JSONs are copied to benchmarks/results/eval-1epoch-vit/.
#   GLSD_DATA=PATH/cifar10-jpg.zip benchmarks/eval_1epoch.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
RUN=${1:-/tmp/r-geo}
DEST=benchmarks/results/eval-1epoch-vit
glsd pretrain cifar10-vit-tiny data.root="$GLSD_DATA" data.fraction=0.02 \
    loss.matching=geometric train.epochs=1 output_dir="$RUN" train.progress=false
glsd eval knn "$RUN" > /dev/null
glsd eval knn "$RUN" --random-init > /dev/null
glsd eval linear "$RUN" > /dev/null
glsd eval linear "$RUN" --random-init > /dev/null
glsd eval dense "$RUN" > /dev/null
glsd eval dense "$RUN" --random-init > /dev/null
mkdir -p "$DEST"
cp "$RUN"/eval/*.json "$DEST"/
echo "benchmarks/eval_1epoch.sh $RUN" > "$DEST"/command.txt
