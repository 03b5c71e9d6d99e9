"""The study's picture, report.png: one panel per evaluation the cells recorded (the metric
against the data fraction, one line per arm with the seed spread, the random-init floor),
and under them the verdicts of report.md on the paper's two claims and on the new arms, per
fraction and metric, as measured.

The verdicts come from :mod:`glsd.tools.study_report` (one rule, two outputs); this module
only lays them out.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional

from glsd.config import MATCHINGS
from glsd.tools.study_report import (BASELINE_ARMS, mean_std, new_arm_verdict, paper_claims,
                                     settings, summarize)

# (record key, its random-init floor's key or None, panel title, digits of the verdicts)
PLOT_METRICS = (
    ("knn_top1", "knn_floor_top1", "k-NN top-1 (%)", 2),
    ("linear_top1", None, "linear probe top-1 (%)", 2),
    ("dense_within_one", "dense_floor_within_one", "dense correspondence: within one cell", 3),
    ("seg_accuracy", "seg_floor_accuracy", "labelled dense probe: cell accuracy", 3),
    ("seg_miou", "seg_floor_miou", "labelled dense probe: mIoU", 3),
)
FONT = 7  # of the verdict text, in points
PANEL_W, PANEL_H = 4.6, 3.3  # inches


def _done(records: list[dict], key: str) -> list[dict]:
    return [r for r in records if r.get("status") == "done" and r.get(key) is not None]


def present_metrics(records: list[dict]) -> list[tuple]:
    """The entries of PLOT_METRICS that at least one finished cell recorded."""
    return [m for m in PLOT_METRICS if _done(records, m[0])]


def floor_line(records: list[dict], floor_key: Optional[str]) -> dict:
    """{fraction: mean floor over every finished cell of that fraction that recorded it}."""
    if floor_key is None:
        return {}
    table = summarize(_done(records, floor_key), floor_key)
    return {f: mean_std([v for c in row.values() for v in c["per_seed"].values()])[0]
            for f, row in table.items()}


def verdict_text(records: list[dict]) -> list[str]:
    """The verdict lines drawn under the panels: per metric a title, then per fraction of the
    grid the paper's two claims and the best new arm against the best of the paper's three,
    each as report.md states it (margin, beyond/within the seed spread), or "not run"."""
    fractions = sorted({r["fraction"] for r in records})
    lines: list[str] = []
    for key, _, title, digits in present_metrics(records):
        table = summarize(_done(records, key), key)
        lines.append(f"{title}:")
        for frac in fractions:
            row = table.get(frac)
            if not row:
                lines.append(f"  fraction {frac:g}: not run")
                continue
            new = new_arm_verdict(row, digits) or (
                f"best new arm vs the best of {'/'.join(BASELINE_ARMS)}: not run")
            for text in [*paper_claims(row, digits, not_run=True), new]:
                lines.append(f"  fraction {frac:g}: {text}")
    return lines


def _panel(ax, records: list[dict], metric: tuple, colors: dict) -> None:
    key, floor_key, title, _ = metric
    table = summarize(_done(records, key), key)
    fracs = sorted(table)
    for arm in MATCHINGS:
        xs = [f for f in fracs if arm in table[f]]
        if not xs:
            continue
        cells = [table[f][arm] for f in xs]
        ax.plot(xs, [c["mean"] for c in cells], marker="o", color=colors[arm], label=arm)
        spread = [(f, c) for f, c in zip(xs, cells) if c["n"] > 1]  # one seed: the point alone
        if spread:
            ax.errorbar([f for f, _ in spread], [c["mean"] for _, c in spread],
                        yerr=[c["std"] for _, c in spread], fmt="none", ecolor=colors[arm], capsize=4)
    floor = floor_line(records, floor_key)
    fx = [f for f in fracs if f in floor and not math.isnan(floor[f])]
    if fx:
        ax.plot(fx, [floor[f] for f in fx], "k--", marker="_", markersize=16, label="random init (floor)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(fracs, [f"{f:g}" for f in fracs])
    ax.set_xlabel("fraction of the train split used for pretraining")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_report(records: list[dict], path: Path) -> None:
    """Write report.png from the study's records (any mix of done, failed and not-run cells;
    at least one done)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = present_metrics(records)
    if not metrics:
        raise ValueError("no finished cell recorded an evaluation: nothing to plot")
    ncols = min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / ncols)
    width = max(PANEL_W * ncols, 2 * PANEL_W)  # one panel alone: room for the verdicts' lines
    chars = int(width * 72 / (0.62 * FONT)) - 6  # monospace glyphs are ~0.6 em wide
    text = [w for line in verdict_text(records)
            for w in textwrap.wrap(line, chars, subsequent_indent="      ") or [""]]
    text_h = 0.4 + len(text) * FONT * 1.25 / 72
    fig = plt.figure(figsize=(width, PANEL_H * nrows + text_h), dpi=120)
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[PANEL_H] * nrows + [text_h])
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {arm: cycle[i % len(cycle)] for i, arm in enumerate(MATCHINGS)}  # same arm, same colour
    for i, metric in enumerate(metrics):
        _panel(fig.add_subplot(grid[i // ncols, i % ncols]), records, metric, colors)
    data = settings(records, "data")
    fig.suptitle(f"Low-data study{f' on {data}' if data else ''}: mean ± seed std per arm",
                 fontsize=10)
    ax = fig.add_subplot(grid[nrows, :])
    ax.axis("off")
    ax.text(0.0, 1.0, "Verdicts (paired by seed; as in report.md)\n" + "\n".join(text),
            va="top", ha="left", family="monospace", fontsize=FONT, transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
