"""The study's picture, report.png: one panel per evaluation the cells recorded (the metric
against the data fraction, one line per arm with the seed spread, the random-init floor),
and a grid of the verdicts of report.md: per metric, the paper's two claims and the best new
arm against the best of the paper's three, per fraction, coloured by whether each holds and
whether its margin is beyond the seed spread, as measured.

The verdicts come from :mod:`glsd.tools.study_report` (one rule, two outputs); this module
only lays them out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from glsd.config import MATCHINGS
from glsd.tools.study_report import (PAPER_CLAIMS, floor_of, outcome, questions, settings,
                                     summarize)

# (record key, its random-init floor's key or None, panel title, digits of the verdicts,
# the short name of the verdict grid's rows)
PLOT_METRICS = (
    ("knn_top1", "knn_floor_top1", "k-NN top-1 (%)", 2, "k-NN"),
    ("linear_top1", None, "linear probe top-1 (%)", 2, "linear"),
    ("dense_within_one", "dense_floor_within_one", "dense correspondence: within one cell", 3, "dense"),
    ("seg_accuracy", "seg_floor_accuracy", "labelled dense probe: cell accuracy", 3, "seg acc"),
    ("seg_miou", "seg_floor_miou", "labelled dense probe: mIoU", 3, "seg mIoU"),
)
QUESTION_ROWS = ("geometric > similarity", "similarity < none", "best new > best of 3")
SHORT = {"none": "none", "similarity": "sim", "geometric": "geo", "soft_geometric": "soft",
         "hybrid": "hyb"}
SHADES = {  # verdict -> (fill, text colour, legend)
    "holds beyond": ("#2e7d32", "white", "holds, beyond the seed spread"),
    "holds": ("#a5d6a7", "black", "holds, within the spread or one seed"),
    "a tie": ("#e0e0e0", "black", "a tie at the report's digits"),
    "does not hold": ("#ef9a9a", "black", "does not hold, within the spread or one seed"),
    "does not hold beyond": ("#c62828", "white", "does not hold, beyond the seed spread"),
    "not run": ("#ffffff", "0.5", "not run"),
}
FONT = 7  # of the verdict grid, in points
PANEL_W, PANEL_H = 4.6, 3.3  # inches
ROW_H = 0.24  # inches per row of the verdict grid


def _done(records: list[dict], key: str) -> list[dict]:
    return [r for r in records if r.get("status") == "done" and r.get(key) is not None]


def present_metrics(records: list[dict]) -> list[tuple]:
    """The entries of PLOT_METRICS that at least one finished cell recorded."""
    return [m for m in PLOT_METRICS if _done(records, m[0])]


def floor_line(records: list[dict], floor_key: Optional[str]) -> dict:
    """{fraction: the floor report.md states (:func:`floor_of`: the mean over its seeds)}."""
    if floor_key is None:
        return {}
    fractions = {r["fraction"] for r in _done(records, floor_key)}
    return {f: floor_of(records, floor_key, f) for f in fractions}


def verdict_grid(records: list[dict]) -> tuple[list[str], list[float], list[list[tuple[str, str]]]]:
    """(row labels, fractions, cells): per recorded metric three rows (the paper's two claims,
    the best new arm against the best of the paper's three), one column per fraction of the
    grid; each cell is (verdict, text) with a verdict key of :data:`SHADES` and the paired
    margin as report.md states it."""
    fractions = sorted({r["fraction"] for r in records})
    labels, cells = [], []
    for key, _, _, digits, short in present_metrics(records):
        table = summarize(_done(records, key), key)
        for i, question in enumerate(QUESTION_ROWS):
            labels.append(f"{short}: {question}")
            cells.append([_verdict_cell(table.get(frac), i, digits) for frac in fractions])
    return labels, fractions, cells


def _verdict_cell(row: Optional[dict], i: int, digits: int) -> tuple[str, str]:
    asked = questions(row) if row else []
    if i >= len(asked) or asked[i][3] is None:
        return "not run", "not run"
    a, b, _, p = asked[i]
    result = outcome(p, digits)
    verdict = f"{result} beyond" if p["clear"] and result != "a tie" else result
    text = f"{p['margin']:+.{digits}f}" + (" (1 seed)" if len(p["diffs"]) == 1 else "")
    if i >= len(PAPER_CLAIMS):  # which arms were the best of each side
        text = f"{SHORT.get(a, a)}-{SHORT.get(b, b)} {text}"
    return verdict, text


def _verdict_panel(ax, records: list[dict]) -> None:
    from matplotlib.patches import Patch, Rectangle

    labels, fractions, cells = verdict_grid(records)
    for y, row in enumerate(cells):
        for x, (verdict, text) in enumerate(row):
            fill, ink, _ = SHADES[verdict]
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=fill, edgecolor="white", linewidth=1.5))
            ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=FONT, color=ink)
    ax.set_xlim(0, len(fractions))
    ax.set_ylim(len(labels), 0)
    ax.set_xticks([x + 0.5 for x in range(len(fractions))], [f"fraction {f:g}" for f in fractions],
                  fontsize=FONT + 1)
    ax.xaxis.tick_top()
    ax.set_yticks([y + 0.5 for y in range(len(labels))], labels, fontsize=FONT + 1)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("Verdicts, paired by seed (margin a - b, as in report.md)", fontsize=9)
    ax.legend(handles=[Patch(facecolor=f, edgecolor="0.7", label=l) for f, _, l in SHADES.values()],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=FONT, frameon=False)


def _panel(ax, records: list[dict], metric: tuple, colors: dict) -> None:
    key, floor_key, title = metric[:3]
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
    free = ncols * nrows - len(metrics)  # two empty slots of the last row take the verdict grid
    grid_h = 1.4 + ROW_H * 3 * len(metrics)
    fits = free >= 2
    heights = [PANEL_H] * (nrows - 1) + ([max(PANEL_H, grid_h)] if fits else [PANEL_H, grid_h])
    width = max(PANEL_W * ncols, 2 * PANEL_W)  # one panel alone: room for the verdict grid
    fig = plt.figure(figsize=(width, sum(heights)), dpi=120)
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {arm: cycle[i % len(cycle)] for i, arm in enumerate(MATCHINGS)}  # same arm, same colour
    for i, metric in enumerate(metrics):
        _panel(fig.add_subplot(grid[i // ncols, i % ncols]), records, metric, colors)
    data = settings(records, "data")
    seeds = {r["seed"] for r in records if r.get("status") == "done"}
    spread = "mean ± seed std per arm" if len(seeds) > 1 else "one seed per arm (no spread)"
    fig.suptitle(f"Low-data study{f' on {data}' if data else ''}: {spread}", fontsize=10)
    _verdict_panel(fig.add_subplot(grid[nrows - 1, ncols - free:] if fits else grid[nrows, :]), records)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
