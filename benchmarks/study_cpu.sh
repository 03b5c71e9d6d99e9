#!/usr/bin/env bash
# The low-data study on this project's 2-core CPU (about 3.5 hours; rerun to resume).
# Run folders (checkpoints) stay outside the repository; the three report files are copied
# to benchmarks/results/study-cifar10-cpu/ together with the command that made them.
#   GLSD_DATA=PATH/cifar10-jpg.zip benchmarks/study_cpu.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
WORK=${1:-../study-cpu-v2}
DEST=benchmarks/results/study-cifar10-cpu
CMD="glsd study cifar10-lowdata-cpu data.root=$GLSD_DATA --out $WORK"
$CMD
mkdir -p "$DEST"
cp "$WORK"/results.json "$WORK"/report.md "$WORK"/report.png "$DEST"/
echo "$CMD" > "$DEST"/command.txt
