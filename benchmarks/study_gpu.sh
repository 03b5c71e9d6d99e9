#!/usr/bin/env bash
# The low-data study on one GPU (H100/H200): 3 matchings x 2 fractions x 3 seeds, end to end,
# all 18 cells at once (a small conv net leaves an H100 mostly idle: concurrent cells
# multiply throughput).
#   benchmarks/study_gpu.sh [WORK_DIR] [key=value ...]    needs ../shared/data/cifar10-jpg.zip
# Copies results.json, report.md, report.png and command.txt to
# benchmarks/results/study-cifar10-gpu-<device>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${1:-/tmp/study-gpu}
shift || true
name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
slug=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
DEST=benchmarks/results/study-cifar10-gpu-$slug
CMD=(-m glsd study cifar10-lowdata-gpu "$@" --out "$WORK" --device cuda --jobs "${JOBS:-18}")
start=$(date +%s)
status=0
# STUDY_TIMEOUT (s) bounds a lent machine's session; unfinished cells resume on a rerun.
timeout "${STUDY_TIMEOUT:-0}" "$PY" "${CMD[@]}" || status=$?
if [ $status -ne 0 ]; then  # report what finished
  "$PY" -m glsd study cifar10-lowdata-gpu "$@" --out "$WORK" --report-only || true
fi
mkdir -p "$DEST"
cp "$WORK"/results.json "$WORK"/report.md "$DEST"/
cp "$WORK"/report.png "$DEST"/ 2>/dev/null || true
echo "python ${CMD[*]}  # on $name, $(( $(date +%s) - start )) s, exit $status" > "$DEST"/command.txt
exit $status
