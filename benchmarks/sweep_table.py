#!/usr/bin/env python
"""The README's tables of a sweep (from a study's results.json): with ``--means``, one table per
metric, mean ± seed std per (fraction, arm) and the floor, as report.md computes them; else one
row per (fraction, seed, metric), every arm's value. The best of each row in bold.

    python benchmarks/sweep_table.py benchmarks/results/study-sweep-cpu/results.json [--means]
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


def mean_tables(records: list[dict]) -> list[str]:
    from glsd.tools.study_report import floor_of, summarize

    lines = []
    for name, key, floor_key, digits in METRICS:
        rows = summarize(records, key)
        if not rows:
            continue
        lines += ["", f"| {name} | floor | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
        for fraction, row in sorted(rows.items()):
            best = max(row, key=lambda m: row[m]["mean"])
            cells = []
            for m in ARMS:
                if m not in row:
                    cells.append("-")
                    continue
                e = row[m]
                text = f"{e['mean']:.{digits}f}" + (f" ± {e['std']:.{digits}f}" if e["n"] > 1 else "")
                text += f" (n={e['n']})" if e["n"] != 2 else ""
                cells.append(f"**{text}**" if m == best else text)
            floor = floor_of(records, floor_key, fraction)
            lines.append(f"| {fraction:g} | {floor:.{digits}f} | " + " | ".join(cells) + " |")
    return lines[1:]


if __name__ == "__main__":
    records = json.load(open(sys.argv[1]))
    print("\n".join(mean_tables(records) if "--means" in sys.argv[2:] else table(records)))
