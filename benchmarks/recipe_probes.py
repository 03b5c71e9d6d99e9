#!/usr/bin/env python
"""Recipe probes: one study cell per recipe variant, run side by side, one summary JSON.

The study's comparison only means something when the global-only arm learns (k-NN at least
10 points above its random-init floor). This script trains that arm (or any arm) under
several recipe variants of a preset, each as its own ``glsd study`` cell in its own folder,
``--jobs`` of them at once (a GPU box runs a dozen small cells concurrently; on a 2-core CPU
use 1), and writes ``summary.json``: per variant, its overrides, k-NN top-1, floor, lift over
the floor, steps and wall time, plus the exact command of each cell.

    python benchmarks/recipe_probes.py data.root=PATH/cifar10-jpg.zip --out /tmp/probes --jobs 12 --device cuda
    python benchmarks/recipe_probes.py data.root=PATH/cifar10-jpg.zip --out /tmp/probes --only base out1024
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (preset, fraction, matching, overrides). Each varies one knob of the preset's current
# recipe (several restore a value of the first recipe: 1,024 prototypes, teacher momentum 0.99,
# 1,000 steps), so the summary reads as an ablation of the recipe the study runs. The committed
# results in benchmarks/results/recipe-probes/ were made by the variants of their time, around
# the first recipe; each of their rows records its own overrides and command.
CPU = "cifar10-lowdata-cpu"
GPU = "cifar10-lowdata-gpu"
VARIANTS: dict[str, tuple[str, float, str, list[str]]] = {
    "base": (CPU, 0.05, "none", []),
    "out1024": (CPU, 0.05, "none", ["model.out_dim=1024"]),
    "lr-half": (CPU, 0.05, "none", ["train.lr=4e-3"]),
    "lr2x": (CPU, 0.05, "none", ["train.lr=1.6e-2"]),
    "mom099": (CPU, 0.05, "none", ["train.momentum_teacher=0.99", "train.momentum_teacher_end=0.99"]),
    "mom0996": (CPU, 0.05, "none", ["train.momentum_teacher=0.996", "train.momentum_teacher_end=1.0"]),
    "tt007": (CPU, 0.05, "none", ["loss.teacher_temp=0.07"]),
    "local8": (CPU, 0.05, "none", ["crops.num_local=8"]),
    "gscale025": (CPU, 0.05, "none", ["crops.global_scale=[0.25,1.0]", "crops.local_scale=[0.05,0.25]"]),
    "steps1000": (CPU, 0.05, "none", ["study.steps=1000"]),
    "steps2000": (CPU, 0.05, "none", ["study.steps=2000"]),
    "base-f0.1": (CPU, 0.1, "none", []),
    # The full split, where the sweep's global-only arm fell under the bar (seed 1: +8.6): knobs
    # that cost no step time (learning rate, teacher momentum) and one that does (local crops).
    "f1-base": (CPU, 1.0, "none", []),
    "f1-lr2x": (CPU, 1.0, "none", ["train.lr=1.6e-2"]),
    "f1-mom096": (CPU, 1.0, "none", ["train.momentum_teacher=0.96", "train.momentum_teacher_end=0.96"]),
    "f1-local8": (CPU, 1.0, "none", ["crops.num_local=8"]),
    # The lever that moved the arm at 5 %: the step budget (twice the sweep's, ~24 min a cell).
    "f1-steps6000": (CPU, 1.0, "none", ["study.steps=6000"]),
    "gpu-base": (GPU, 0.05, "none", []),
    "gpu-out1024": (GPU, 0.05, "none", ["model.out_dim=1024"]),
    "gpu-lr2x": (GPU, 0.05, "none", ["train.lr=1.6e-2"]),
    "gpu-steps1000": (GPU, 0.05, "none", ["study.steps=1000"]),
}


def best_overrides(summary: Path, prefix: str) -> list[str]:
    """The variant overrides (extras excluded) of the best k-NN among variants named PREFIX*."""
    rows = [r for r in json.loads(summary.read_text())["rows"]
            if r["name"].startswith(prefix) and r.get("knn_top1") is not None]
    if not rows:
        raise SystemExit(f"no finished variant named {prefix}* in {summary}")
    return VARIANTS[max(rows, key=lambda r: r["knn_top1"])["name"]][3]


def cell_command(name: str, out: Path, device: str, seed: int, extra: list[str]) -> list[str]:
    preset, fraction, matching, overrides = VARIANTS[name]
    return [sys.executable, "-m", "glsd", "study", preset, *overrides, *extra,
            "--out", str(out / name), "--fractions", str(fraction), "--matchings", matching,
            "--seeds", str(seed), "--device", device]


def run_variant(name: str, out: Path, device: str, seed: int, extra: list[str]) -> dict:
    cmd = cell_command(name, out, device, seed, extra)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    preset, fraction, matching, overrides = VARIANTS[name]
    row = {"name": name, "preset": preset, "fraction": fraction, "matching": matching, "seed": seed,
           "overrides": overrides + extra, "rc": rc, "wall_s": round(time.time() - start, 1),
           "command": " ".join(cmd[1:])}
    results = out / name / "results.json"
    if results.is_file():
        rec = json.loads(results.read_text())[0]
        row.update({k: rec.get(k) for k in ("status", "knn_top1", "knn_floor_top1", "steps", "final")})
        if rec.get("knn_top1") is not None:
            row["lift"] = round(rec["knn_top1"] - rec["knn_floor_top1"], 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extra", nargs="*", help="key=value overrides added to every variant")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--best", metavar="PREFIX",
                    help="print the overrides of the best finished variant named PREFIX* in OUT; run nothing")
    args = ap.parse_args(argv)
    if args.best is not None:
        print(" ".join(best_overrides(args.out / "summary.json", args.best)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    summary_path = args.out / "summary.json"
    rows: list[dict] = []
    lock = threading.Lock()

    def one(name: str) -> None:
        r = run_variant(name, args.out, args.device, args.seed, args.extra)
        with lock:  # the summary is rewritten as each variant ends: a timeout keeps the finished
            rows.append(r)
            rows.sort(key=lambda x: names.index(x["name"]))
            summary_path.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
        print(f"[probes] {name}: knn {r.get('knn_top1')} floor {r.get('knn_floor_top1')} "
              f"lift {r.get('lift')} ({r['wall_s']} s, rc {r['rc']})", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, names))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
