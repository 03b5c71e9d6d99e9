#!/usr/bin/env bash
# The fraction sweep on this project's 2-core CPU: cifar10-lowdata-cpu's grid (1/5/20/100% x five
# arms x two seeds, k-NN + dense + seg), about 15 minutes a cell on a quiet machine, so about 10
# hours in all: more than one working session. So it runs one cell per `glsd study` call and,
# after each, archives what the report needs (each finished cell's record and metrics, the
# random-init floors) into benchmarks/results/study-sweep-cpu/cells/, which is committed. On a
# new machine the archive is laid back into WORK first: finished cells are skipped, and a cell
# stopped on this machine resumes from its checkpoint (every 500 steps). Each archived cell
# names in commit.txt the last commit that changed src/ when it started: the code it ran
# (and, for a cell resumed from its checkpoint under newer code, that commit too).
# Seed 0 of every fraction first, then seed 1, so a partial grid already spans the fractions;
# then seed 2 where two seeds leave a comparison within the spread.
#   GLSD_DATA=PATH/cifar10-jpg.zip benchmarks/study_cpu.sh [WORK_DIR]
# A row retuned on its own (the preset's recipe with key=value changes, some fractions only)
# goes to its own results folder, e.g.
#   GLSD_DATA=... GLSD_OVERRIDES="train.momentum_teacher=0.96 train.momentum_teacher_end=0.96" \
#   GLSD_FRACTIONS=1.0 GLSD_DEST=benchmarks/results/study-sweep-cpu-f1-mom096 benchmarks/study_cpu.sh WORK
# GLSD_MATCHINGS="none" runs some arms only (a new recipe's global-only arm at every fraction
# first, to check its bar before the other arms; rerun without it for the rest of the grid).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip (ImageFolder layout: train/<class>/*.jpg, test/<class>/*.jpg)}"
WORK=${1:-../study-sweep-cpu}
DEST=${GLSD_DEST:-benchmarks/results/study-sweep-cpu}
read -r -a OVERRIDES <<< "${GLSD_OVERRIDES:-}"
ARCHIVE=$DEST/cells
PRESET=cifar10-lowdata-cpu
mkdir -p "$WORK" "$ARCHIVE"

restore() {  # the archive into WORK, never over a newer local copy
  local f g cell
  for f in "$ARCHIVE"/*.json; do
    if [ -e "$f" ] && [ ! -e "$WORK/$(basename "$f")" ]; then cp "$f" "$WORK"/; fi
  done
  for f in "$ARCHIVE"/*/cell.json; do
    [ -e "$f" ] || continue
    cell=$(basename "$(dirname "$f")")
    mkdir -p "$WORK/$cell"
    for g in "$ARCHIVE/$cell"/*; do
      if [ ! -e "$WORK/$cell/$(basename "$g")" ]; then cp "$g" "$WORK/$cell"/; fi
    done
  done
}

archive() {  # the finished cells and the floors out of WORK, each with the commit it ran
  local f
  for f in "$WORK"/*floor-*.json; do [ -e "$f" ] && cp "$f" "$ARCHIVE"/; done
  for f in "$WORK"/*/cell.json; do
    [ -e "$f" ] || continue
    local dir; dir=$(dirname "$f")
    local cell; cell=$(basename "$dir")
    [ -e "$ARCHIVE/$cell/cell.json" ] && continue  # archived already, with its commit
    mkdir -p "$ARCHIVE/$cell"
    cp "$f" "$dir"/metrics.jsonl "$ARCHIVE/$cell"/
    cp "$dir"/eval/*.json "$ARCHIVE/$cell"/ 2>/dev/null || true
    if [ -e "$WORK/.commit-$cell" ]; then  # written when the cell started
      cp "$WORK/.commit-$cell" "$ARCHIVE/$cell/commit.txt"
    else
      echo "not recorded (finished before this script wrote commits)" > "$ARCHIVE/$cell/commit.txt"
    fi
  done
}

run_cell() {  # $1 fraction, $2 matching, $3 seed; a cell finished here or archived is skipped
  local name; name="f$(python3 -c "print(f'{float($1):g}')")-$2-s$3"
  [ -e "$WORK/$name/cell.json" ] && return 0  # no torch start-up per finished cell on a resume
  # the last commit that changed the package: the code the cell runs (a cell resumed from
  # its checkpoint keeps the commit it started on; the new one is added)
  local commit
  commit="$(git log -1 --format=%h -- src)$(git diff --quiet HEAD -- src || echo '+uncommitted src changes')"
  if [ -e "$WORK/.commit-$name" ] && ! grep -q "^$commit" "$WORK/.commit-$name"; then
    echo "$commit (resumed)" >> "$WORK/.commit-$name"
  elif [ ! -e "$WORK/.commit-$name" ]; then
    echo "$commit" > "$WORK/.commit-$name"
  fi
  # A failed cell is in the report (its error too); the grid goes on. A signal stops it.
  glsd study "$PRESET" "data.root=$GLSD_DATA" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    --fractions "$1" --matchings "$2" --seeds "$3" --out "$WORK" || { rc=$?; [ "$rc" -ge 128 ] && exit "$rc"; echo "[study_cpu] $name failed (exit $rc); going on" >&2; }
  archive
}

report() {
  glsd study "$PRESET" "data.root=$GLSD_DATA" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --out "$WORK" --report-only \
    ${GLSD_FRACTIONS:+--fractions $GLSD_FRACTIONS}
  cp "$WORK"/results.json "$WORK"/report.md "$DEST"/
  cp "$WORK"/report.png "$DEST"/ 2>/dev/null || true
}

restore
read -r -a fractions < <(python3 -c "from glsd.config import load_config; print(*load_config('$PRESET').study.fractions)")
if [ -n "${GLSD_FRACTIONS:-}" ]; then read -r -a fractions <<< "$GLSD_FRACTIONS"; fi
read -r -a matchings < <(python3 -c "from glsd.config import load_config; print(*load_config('$PRESET').study.matchings)")
if [ -n "${GLSD_MATCHINGS:-}" ]; then read -r -a matchings <<< "$GLSD_MATCHINGS"; fi
for seed in 0 1; do
  for fraction in "${fractions[@]}"; do
    for matching in "${matchings[@]}"; do
      run_cell "$fraction" "$matching" "$seed"
    done
    report  # after each fraction: the partial grid, ready to commit
  done
done
# Seed 2 only for the arms of a k-NN comparison that seeds 0 and 1 leave within the spread
# (the paper's two claims, and the best new arm vs the best of the paper's arms), decided
# from seeds 0 and 1 alone so that a resumed run plans the same cells.
extra=$(python3 - "$WORK/results.json" <<'EOF_PLAN'
import json, sys
from glsd.tools.study_report import extra_seed_arms
records = [r for r in json.load(open(sys.argv[1])) if r["seed"] in (0, 1)]
for fraction, arms in extra_seed_arms(records).items():
    print(fraction, *arms)
EOF_PLAN
)
echo "seed 2 for: ${extra:-nothing (every comparison is beyond the spread)}"
while read -r fraction arms; do
  [ -n "$fraction" ] || continue
  for matching in $arms; do
    run_cell "$fraction" "$matching" 2
  done
  report
done <<< "$extra"
report
