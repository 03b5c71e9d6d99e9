#!/usr/bin/env python
"""The README's table of a partial sweep: one row per (fraction, seed, metric), every arm's
value, the random-init floor, the best in bold (from a study's results.json).

    python benchmarks/sweep_table.py benchmarks/results/study-sweep-cpu/results.json
"""
from __future__ import annotations

import json
import sys

ARMS = ("none", "similarity", "geometric", "soft_geometric", "hybrid")
METRICS = (("k-NN top-1 (%)", "knn_top1", "knn_floor_top1", 2),
           ("dense within one", "dense_within_one", "dense_floor_within_one", 3),
           ("seg cell accuracy", "seg_accuracy", "seg_floor_accuracy", 3),
           ("seg mIoU", "seg_miou", "seg_floor_miou", 3))


def table(records: list[dict]) -> list[str]:
    done = [r for r in records if r.get("status") == "done"]
    lines = ["| fraction | seed | metric | floor | " + " | ".join(ARMS) + " |",
             "|---|---|---|---|" + "---|" * len(ARMS)]
    for fraction in sorted({r["fraction"] for r in done}):
        for seed in sorted({r["seed"] for r in done if r["fraction"] == fraction}):
            row = {r["matching"]: r for r in done if r["fraction"] == fraction and r["seed"] == seed}
            for name, key, floor_key, digits in METRICS:
                values = {m: row[m][key] for m in row if row[m].get(key) is not None}
                if not values:
                    continue
                best = max(values, key=values.get)
                floor = next((r[floor_key] for r in row.values() if r.get(floor_key) is not None), None)
                cells = [("**{:.{d}f}**" if m == best else "{:.{d}f}").format(values[m], d=digits)
                         if m in values else "-" for m in ARMS]
                floor_text = "-" if floor is None else f"{floor:.{digits}f}"
                lines.append(f"| {fraction:g} | {seed} | {name} | {floor_text} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(table(json.load(open(sys.argv[1])))))
