#!/usr/bin/env bash
# The low-data study on one GPU (H100/H200): the cifar10-lowdata-gpu grid (its study: section), end to end.
# A small conv net's step is ~1,000 tiny kernels, so one cell leaves the GPU mostly idle and
# cells run side by side. Without CUDA MPS the processes' kernels take turns on the GPU, so
# MPS is started when the driver has it (MPS=0 turns that off), and JOBS defaults to 18 with
# MPS, else 9 (the cells then finish in waves).
#   GLSD_DATA=PATH/cifar10-jpg.zip benchmarks/study_gpu.sh [WORK_DIR] [key=value ...]
# Copies results.json, report.md, report.png and command.txt to
# benchmarks/results/study-sweep-gpu-<device>/ (the earlier 5%/10% grid is in study-cifar10-gpu-nvidia-h200/).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${1:-/tmp/study-gpu}
shift || true
name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
slug=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
DEST=benchmarks/results/study-sweep-gpu-$slug
mps=off
quit_mps() { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true; }
if [ "${MPS:-1}" != 0 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  if echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
    mps=on  # a daemon left by an earlier run (e.g. one that was killed): use it, leave it
  elif nvidia-cuda-mps-control -d; then
    trap quit_mps EXIT
    # A client must work under it, else stop it and take turns.
    if timeout 60 "$PY" -c 'import torch; assert (torch.ones(1, device="cuda") + 1).item() == 2'; then
      mps=on
    else
      quit_mps; trap - EXIT
    fi
  fi
fi
echo "study_gpu: CUDA MPS $mps" >&2
JOBS=${JOBS:-$([ $mps = on ] && echo 18 || echo 9)}
CMD=(-m glsd study cifar10-lowdata-gpu "data.root=$GLSD_DATA" "$@" --out "$WORK" --device cuda --jobs "$JOBS")
start=$(date +%s)
status=0
# STUDY_TIMEOUT (s) bounds a lent machine's session; unfinished cells resume on a rerun.
timeout "${STUDY_TIMEOUT:-0}" "$PY" "${CMD[@]}" || status=$?
if [ $status -ne 0 ]; then  # report what finished
  "$PY" -m glsd study cifar10-lowdata-gpu "data.root=$GLSD_DATA" "$@" --out "$WORK" --report-only || true
fi
mkdir -p "$DEST"
cp "$WORK"/results.json "$WORK"/report.md "$DEST"/
cp "$WORK"/report.png "$DEST"/ 2>/dev/null || true
echo "python ${CMD[*]}  # on $name, CUDA MPS $mps, $(( $(date +%s) - start )) s, exit $status" > "$DEST"/command.txt
exit $status
