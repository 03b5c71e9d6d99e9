#!/usr/bin/env bash
# A lent GPU's few minutes, one bounded call per part (the device tool runs a command for at
# most 10 minutes and lends about 15 in all, start-up included), most important first:
#
#   study  seed 0 of the fraction sweep on the GPU preset (cifar10-lowdata-gpu: 4 fractions x
#          5 arms = 20 cells, one wave under CUDA MPS), bounded by STUDY_TIMEOUT (default 420 s);
#          unfinished cells resume on a rerun. (The study issue, priority 2.)
#   limit  benchmarks/gpu_limit.py with tight budgets, then benchmarks/photo_data.py on CUDA.
#          (The performance issue's GPU items.)
#   head   the accuracy check a lighter local head needs on the ViT preset (cifar10-vit-tiny:
#          its 512/1024 local head against the 64/256 one of the conv presets, which makes the
#          geometric step as fast as the global-only one on the CPU): the 5 % cell, geometric,
#          seeds 0 and 1, k-NN + dense, all four cells side by side, bounded by HEAD_TIMEOUT.
#
# The data zip does not travel by itself: copy it into a folder of the checkout that
# .git/info/exclude ignores and name that folder in the device call's `carry`, e.g.
#   mkdir -p gpu_data && cp PATH/cifar10-jpg.zip gpu_data/ && echo gpu_data >> .git/info/exclude
#   (device call) GLSD_DATA=gpu_data/cifar10-jpg.zip benchmarks/gpu_session.sh study
# Everything worth keeping is copied under $OUT (the folder the device tool brings back).
set -u
cd "$(dirname "$0")/.."
part=${1:?usage: benchmarks/gpu_session.sh study|limit|head}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
nvidia-smi -L | tee "$OUT/gpu.txt"
"$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)' | tee -a "$OUT/gpu.txt"
start=$(date +%s)
case "$part" in
  study)
    : "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip}"
    STUDY_TIMEOUT=${STUDY_TIMEOUT:-420} JOBS=${JOBS:-20} bash benchmarks/study_gpu.sh /tmp/study-gpu \
      "study.seeds=[0]" > "$OUT/study.log" 2>&1
    echo "study exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
    cp -r benchmarks/results/study-sweep-gpu-* "$OUT"/ 2>/dev/null
    # the finished cells' records, to lay into the next call's work folder or commit
    tar czf "$OUT/cells.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.npy' \
      -C /tmp study-gpu 2>/dev/null
    tail -5 "$OUT/study.log"
    ;;
  limit)
    # budgets for about 6 minutes (the defaults take about 8); the JSON is rewritten per part.
    # Batch 256 of the paper step needs ~125 GiB: only on a card with more than 100 GiB.
    mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    batches=64,128; [ "${mem_mib:-0}" -gt 100000 ] && batches=64,128,256
    timeout 420 "$PY" benchmarks/gpu_limit.py --out "$OUT/gpu-limit.json" --batches "${BATCHES:-$batches}" \
      ${LIMIT_ARGS:---budget-step 150 --budget-timm 50 --budget-compile 150 --compile-timeout 120} \
      > "$OUT/gpu-limit.log" 2>&1
    echo "gpu_limit exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu-limit.log"
    zip_arg=()
    [ -n "${GLSD_DATA:-}" ] && zip_arg=(--zip "$GLSD_DATA")
    timeout 150 "$PY" benchmarks/photo_data.py "${zip_arg[@]}" --out "$OUT/photo-data-cuda.json" \
      > "$OUT/photo-data.log" 2>&1
    echo "photo_data exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/photo-data.log"
    tail -n 3 "$OUT/gpu-limit.log" "$OUT/photo-data.log"
    ;;
  head)
    : "${GLSD_DATA:?set GLSD_DATA to the CIFAR-10 JPEG zip}"
    for head in 512-1024 64-256; do
      hidden=${head%-*}; protos=${head#*-}
      timeout "${HEAD_TIMEOUT:-480}" "$PY" -m glsd study cifar10-vit-tiny "data.root=$GLSD_DATA" \
        data.augment_on=device data.num_workers=4 "model.local_hidden_dim=$hidden" \
        "model.local_out_dim=$protos" --fractions 0.05 --matchings geometric --seeds 0 1 \
        --evals knn dense --device cuda --jobs 2 --out "/tmp/vit-head-$head" \
        > "$OUT/head-$head.log" 2>&1 &
    done
    wait
    for head in 512-1024 64-256; do
      mkdir -p "$OUT/head-$head" && cp /tmp/vit-head-$head/results.json /tmp/vit-head-$head/report.md "$OUT/head-$head/" 2>/dev/null
      tail -3 "$OUT/head-$head.log"
    done
    echo "head: $(( $(date +%s) - start )) s"
    ;;
  *) echo "unknown part $part: study, limit or head" >&2; exit 2 ;;
esac
ls -la "$OUT"
