#!/usr/bin/env bash
# Training-step images/s on one GPU at a paper-like configuration (Swin-T, 224/96 crops,
# batch 64, bf16, device augmentation): matching none vs geometric. Under 8 minutes on one
# H100/H200 (a hard limit of 7.5 minutes is set below).
#   benchmarks/gpu_bench.sh [gpu_bench.py options, e.g. --model vit_s16]
# writes benchmarks/results/gpu-bench-<device>.json (not to be committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
if [ -z "$name" ]; then
  echo "gpu_bench.sh: no CUDA device visible" >&2
  exit 1
fi
slug=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
out="benchmarks/results/gpu-bench-${slug}.json"
mkdir -p benchmarks/results
echo "gpu_bench.sh: $name -> $out" >&2
timeout 450 "$PY" benchmarks/gpu_bench.py --out "$out" "$@" >/dev/null
echo "$out"
