#!/usr/bin/env bash
# The low-data study on one GPU (H100/H200): 3 matchings x 2 fractions x 3 seeds, end to end.
# Usage: benchmarks/study_gpu.sh [WORK_DIR]; needs ../shared/data/cifar10-jpg.zip.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/study-gpu}
DEVICE=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
DEST=benchmarks/results/study-cifar10-gpu-$DEVICE
CMD="glsd study cifar10-lowdata-gpu --out $WORK device=cuda"
start=$(date +%s)
$CMD
mkdir -p "$DEST"
cp "$WORK"/results.json "$WORK"/report.md "$WORK"/report.png "$DEST"/
echo "$CMD  # on $DEVICE, $(( $(date +%s) - start )) s" > "$DEST"/command.txt
