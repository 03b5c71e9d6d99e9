#!/usr/bin/env bash
# The fraction sweep on this project's 2-core CPU: cifar10-lowdata-cpu's grid (1/5/20/100% x five
# arms x two seeds, k-NN + dense + seg), about 15 minutes a cell on a quiet machine, so about 10
# hours in all: more than one working session. So it runs one cell per `glsd study` call (with
# GLSD_JOBS, one call per seed) and archives what the report needs as each cell ends (each
# finished cell's record and metrics, the random-init floors) into
# benchmarks/results/study-sweep-cpu/cells/, which is committed. On a
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
# GLSD_JOBS=2 trains the cells of one seed two at a time, one torch thread each: on this 2-core
# CPU the training of two 300-step cells took 151 s side by side against 170 s one after the
# other, in one run (benchmarks/study_jobs.py; session15-checks/study-jobs.json). One thread
# instead of two changes the order of floating-point sums: such a cell's numbers differ from a
# two-thread run's as on another machine.
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
    cp "$dir"/metrics.jsonl "$ARCHIVE/$cell"/
    cp "$dir"/eval/*.json "$ARCHIVE/$cell"/ 2>/dev/null || true
    if [ -e "$WORK/.commit-$cell" ]; then  # written when the cell started
      cp "$WORK/.commit-$cell" "$ARCHIVE/$cell/commit.txt"
    else
      echo "not recorded (finished before this script wrote commits)" > "$ARCHIVE/$cell/commit.txt"
    fi
    cp "$f" "$ARCHIVE/$cell"/  # last: it marks the cell archived, so a copy cut short is redone
  done
}

cell_name() {  # $1 fraction, $2 matching, $3 seed
  echo "f$(python3 -c "print(f'{float($1):g}')")-$2-s$3"
}

record_commit() {  # $1 cell: the last commit that changed the package, the code the cell runs
  # (a cell resumed from its checkpoint keeps the commit it started on; the new one is added)
  local commit
  commit="$(git log -1 --format=%h -- src)$(git diff --quiet HEAD -- src || echo '+uncommitted src changes')"
  if [ -e "$WORK/.commit-$1" ] && ! grep -q "^$commit" "$WORK/.commit-$1"; then
    echo "$commit (resumed)" >> "$WORK/.commit-$1"
  elif [ ! -e "$WORK/.commit-$1" ]; then
    echo "$commit" > "$WORK/.commit-$1"
  fi
}

run_cells() {  # $1 seed, $2 fractions (words), then matchings: their cells not finished here
  # or in the archive, in one `glsd study` call. GLSD_JOBS=N trains N at once, the cores split
  # between them (glsd study --jobs).
  local seed=$1 fractions_=$2 fraction matching todo_f=() todo_m=()
  shift 2
  for fraction in $fractions_; do
    for matching in "$@"; do
      local name; name=$(cell_name "$fraction" "$matching" "$seed")
      [ -e "$WORK/$name/cell.json" ] && continue  # no torch start-up per finished cell on a resume
      record_commit "$name"
      [[ " ${todo_f[*]} " == *" $fraction "* ]] || todo_f+=("$fraction")
      [[ " ${todo_m[*]} " == *" $matching "* ]] || todo_m+=("$matching")
    done
  done
  [ "${#todo_f[@]}" -gt 0 ] || return 0
  # Cells of one call finish hours apart: a loop beside the study archives each within a minute
  # of its end. The study stays in the foreground, so Ctrl-C and signals reach it.
  ( while sleep 30; do archive; done ) &
  local archiver=$! rc=0
  trap 'kill "$archiver" 2>/dev/null' EXIT
  glsd study "$PRESET" "data.root=$GLSD_DATA" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --fractions "${todo_f[@]}" \
    --matchings "${todo_m[@]}" --seeds "$seed" --out "$WORK" --jobs "${GLSD_JOBS:-1}" || rc=$?
  kill "$archiver" 2>/dev/null || true
  wait "$archiver" 2>/dev/null || true
  trap - EXIT
  archive
  # A failed cell is in the report (its error too); the grid goes on. A signal stops it.
  if [ "$rc" -ge 128 ]; then exit "$rc"; fi
  if [ "$rc" -ne 0 ]; then echo "[study_cpu] seed $seed (${todo_f[*]} x ${todo_m[*]}) failed (exit $rc); going on" >&2; fi
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
  if [ "${GLSD_JOBS:-1}" -gt 1 ]; then  # one call a seed: only its last cell trains alone
    run_cells "$seed" "${fractions[*]}" "${matchings[@]}"
    report
    continue
  fi
  for fraction in "${fractions[@]}"; do
    for matching in "${matchings[@]}"; do
      run_cells "$seed" "$fraction" "$matching"  # each cell archived as soon as it ends
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
  # shellcheck disable=SC2086  # the arms are words
  run_cells 2 "$fraction" $arms
  report
done <<< "$extra"
report
