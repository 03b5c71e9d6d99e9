#!/usr/bin/env bash
# The fraction sweep on this project's 2-core CPU: cifar10-lowdata-cpu's grid (1/5/20/100% x five
# arms x two seeds, k-NN + dense + seg), about 15 minutes a cell on a quiet machine, so about 10
# hours in all: rerun to resume (finished cells are skipped, a stopped one resumes from its
# checkpoint); the report files are copied to benchmarks/results/study-sweep-cpu/ each time.
# Seed 0 of every fraction first, then seed 1, so a partial grid already spans the fractions.
#   GLSD_DATA=PATH/cifar10-jpg.zip benchmarks/study_cpu.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
WORK=${1:-../study-sweep-cpu}
DEST=benchmarks/results/study-sweep-cpu
for seeds in 0 1; do
  glsd study cifar10-lowdata-cpu "data.root=$GLSD_DATA" --seeds $seeds --out "$WORK"
done
glsd study cifar10-lowdata-cpu "data.root=$GLSD_DATA" --out "$WORK" --report-only
mkdir -p "$DEST"
cp "$WORK"/results.json "$WORK"/report.md "$WORK"/report.png "$DEST"/
