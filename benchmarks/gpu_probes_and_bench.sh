#!/usr/bin/env bash
# First half of a lent GPU session (the second is benchmarks/study_gpu.sh): a smoke run of
# the CUDA path, the recipe probes side by side (benchmarks/recipe_probes.py), then the
# training-step benchmark (benchmarks/gpu_bench.sh). Writes to $OUT (default /tmp/gpu-out).
#   GLSD_DATA=PATH/cifar10-jpg.zip OUT=/tmp/o PROBE_S=240 benchmarks/gpu_probes_and_bench.sh
set -u
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export PYTHON="$PY"  # gpu_bench.sh runs the same interpreter
nvidia-smi -L
"$PY" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'
smoke="$PY -m glsd pretrain cifar10-lowdata-cpu data.root=$GLSD_DATA device=cuda data.augment_on=device data.fraction=0.02 loss.matching=geometric train.max_steps=30 train.progress=false output_dir=/tmp/smoke"
if ! { timeout 150 $smoke && timeout 90 "$PY" -m glsd eval knn /tmp/smoke --device cuda; } > "$OUT/smoke.log" 2>&1; then
  tail -40 "$OUT/smoke.log"; exit 3
fi
grep -E "images_per_sec|top1" "$OUT/smoke.log" | tail -3
t0=$(date +%s)
timeout "${PROBE_S:-240}" "$PY" benchmarks/recipe_probes.py --out /tmp/probes --jobs 16 --device cuda "data.root=$GLSD_DATA" data.augment_on=device data.num_workers=2
echo "probes: $(( $(date +%s) - t0 )) s"
cp /tmp/probes/summary.json "$OUT/probes-summary.json" 2>/dev/null
t0=$(date +%s)
timeout 150 bash benchmarks/gpu_bench.sh --steps 10 --modes none,similarity,geometric && cp benchmarks/results/gpu-bench-*.json "$OUT/"
echo "bench: $(( $(date +%s) - t0 )) s"
tar czf "$OUT/probe-runs.tgz" --exclude='*.pt' --exclude='*.safetensors' -C /tmp probes smoke 2>/dev/null
ls -la "$OUT"
