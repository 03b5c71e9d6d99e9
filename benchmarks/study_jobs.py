"""Wall time of the same study cells one at a time (every core each) and ``--jobs N`` at a time
(the cores split between them), in one run on one machine.

    python benchmarks/study_jobs.py data.root=PATH/cifar10-jpg.zip --out FILE.json
        [--preset cifar10-lowdata-cpu] [--steps 200] [--jobs 2] [--matchings none geometric]

Each arm trains fresh cells into its own scratch folder (the k-NN floor included), so the
times hold everything a cell does. The arms run alternately, ``--rounds`` times each, the first
arm alternating too; the ratio is sequential time / parallel time per round (> 1: parallel
is faster). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def study_command(args, out: Path, jobs: int) -> list[str]:
    return ["glsd", "study", args.preset, *args.overrides, f"study.steps={args.steps}",
            "--fractions", str(args.fraction), "--matchings", *args.matchings, "--seeds", "0",
            "--evals", "knn", "--out", str(out), "--jobs", str(jobs)]


def timed_study(args, scratch: Path, jobs: int) -> dict:
    out = scratch / f"jobs{jobs}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(study_command(args, out, jobs), check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = json.loads((out / "results.json").read_text())
    return {"jobs": jobs, "wall_s": round(wall, 1), "load_avg_after": os.getloadavg()[0],
            "cells": {r["name"]: {"knn_top1": r.get("knn_top1"), "wall_time_s": r.get("wall_time_s"),
                                  "train_s": training_seconds(out / r["name"])} for r in records}}


def training_seconds(run_dir: Path):
    """About the cell's pretraining wall time: from its config.yaml (written as training
    starts) to its last metrics line."""
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not (config.exists() and metrics.exists()):
        return None
    return round(metrics.stat().st_mtime - config.stat().st_mtime, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides (data.root=...)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="cifar10-lowdata-cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--matchings", nargs="+", default=["none", "geometric"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="glsd-study-jobs-") as tmp:
        for round_ in range(args.rounds):
            order = (args.jobs, 1) if round_ % 2 == 0 else (1, args.jobs)
            runs.append([timed_study(args, Path(tmp), jobs) for jobs in order])
    ratios = [next(r["wall_s"] for r in pair if r["jobs"] == 1)
              / next(r["wall_s"] for r in pair if r["jobs"] == args.jobs) for pair in runs]
    result = {"command": " ".join(["python", *sys.argv]), "cpu_count": os.cpu_count(),
              "cells": len(args.matchings), "steps": args.steps, "runs": runs,
              "sequential_over_parallel": [round(r, 3) for r in ratios],
              "median_ratio": round(statistics.median(ratios), 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
