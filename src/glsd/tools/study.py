"""The low-data study: pretrain + evaluate every (fraction, matching, seed) cell, then report.

Each cell lives in its own run folder under the study folder, so the study resumes for free:
a cell whose evaluation JSON exists is skipped, an interrupted one resumes from its
checkpoint, a failed one is recorded and the others go on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Optional, Sequence

from glsd.config import Config, config_hash, load_config

KNN_KEY = "knn"


@dataclass
class Cell:
    fraction: float
    matching: str
    seed: int

    @property
    def name(self) -> str:
        return f"f{self.fraction:g}-{self.matching}-s{self.seed}"

    def overrides(self, out: Path) -> list[str]:
        # The seed picks both the subset and the initialisation; matchings of one seed share
        # both, so their comparison is paired.
        return [f"data.fraction={self.fraction}", "data.num_images=null",
                f"loss.matching={self.matching}", f"train.seed={self.seed}",
                f"data.subset_seed={self.seed}", f"output_dir={out / self.name}"]


def study_cells(cfg: Config, fractions=None, matchings=None, seeds=None) -> list[Cell]:
    s = cfg.study
    return [Cell(f, m, seed) for f in (fractions or s.fractions)
            for seed in (seeds or s.seeds) for m in (matchings or s.matchings)]


def run_study(config: str, out: Path, overrides: Sequence[str] = (), fractions=None,
              matchings=None, seeds=None, evals=None, device: str = "auto",
              report_only: bool = False, jobs: int = 1) -> dict:
    """Run (or, with ``report_only``, only collect) every cell, then write the report.

    ``jobs`` > 1 trains that many cells at once in separate processes: on a GPU box a small
    model leaves the device mostly idle, so concurrent cells multiply throughput. On a
    2-core CPU keep 1.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(config, overrides)
    evals = list(evals or base.study.evals)
    cells = study_cells(base, fractions, matchings, seeds)
    if report_only:
        records = [collected_record(out, cell) for cell in cells]
    else:
        (out / "study.json").write_text(json.dumps({
            "config": config, "overrides": list(overrides), "evals": evals,
            "cells": [c.name for c in cells]}, indent=2))
        run = run_cells_in_parallel if jobs > 1 else run_cells_in_order
        records = run(config, overrides, cells, out, evals, device, jobs)
    write_outputs(out, records)
    return {"records": records, "out": str(out)}


def collected_record(out: Path, cell: Cell, status: str = "not run") -> dict:
    path = out / cell.name / "cell.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"name": cell.name, "fraction": cell.fraction, "matching": cell.matching,
            "seed": cell.seed, "status": status}


def run_cells_in_order(config, overrides, cells, out, evals, device, jobs) -> list[dict]:
    records = []
    for i, cell in enumerate(cells):
        print(f"[study] cell {i + 1}/{len(cells)}: {cell.name}", flush=True)
        records.append(run_cell(config, overrides, cell, out, evals, device))
        write_outputs(out, records)
    return records


def run_cells_in_parallel(config, overrides, cells, out, evals, device, jobs) -> list[dict]:
    """The same cells, ``jobs`` at a time. Spawned (not forked) workers: CUDA cannot be
    re-initialised in a forked child. Records keep the grid's order whatever finishes first."""
    records = [collected_record(out, cell, status="running") for cell in cells]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_cell, config, list(overrides), cell, out, evals, device): i
                   for i, cell in enumerate(cells)}
        print(f"[study] {len(cells)} cells, {jobs} at a time", flush=True)
        try:
            for future in as_completed(futures):
                i = futures[future]
                records[i] = future.result()
                print(f"[study] finished {cells[i].name}: {records[i].get('status')}", flush=True)
                write_outputs(out, records)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # unfinished cells resume next time
            raise
    return records


def run_cell(config: str, overrides: Sequence[str], cell: Cell, out: Path, evals: list[str],
             device: str) -> dict:
    from glsd.eval.runner import run_eval
    from glsd.train.pretrain import TrainingInterrupted, pretrain

    cfg = load_config(config, [*overrides, *cell.overrides(out)])
    run_dir = Path(cfg.output_dir)
    record_path = run_dir / "cell.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    start = time.time()
    try:
        cfg = with_step_budget(cfg)
        pretrain(cfg)
        results = {kind: run_eval(kind, run_dir, device=device) for kind in evals}
        results["knn_random_init"] = knn_floor(run_dir, out / f"floor-f{cell.fraction:g}-s{cell.seed}.json", device)
    except TrainingInterrupted:
        raise  # a signal stops the whole study; the cell resumes on the next run
    except Exception as e:  # noqa: BLE001 - one failed cell must not stop the grid
        traceback.print_exc()
        return {"name": cell.name, "fraction": cell.fraction, "matching": cell.matching,
                "seed": cell.seed, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    record = cell_record(cfg, cell, run_dir, results, time.time() - start)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def with_step_budget(cfg: Config) -> Config:
    """Give the cell ``study.steps`` optimisation steps whatever its subset size."""
    if cfg.study.steps is None:
        return cfg
    from glsd.data.loader import select_images

    n_images = len(select_images(cfg, None)[1])
    steps_per_epoch = max(1, n_images // cfg.train.batch_size)
    epochs = max(1, round(cfg.study.steps / steps_per_epoch))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


def knn_floor(run_dir: Path, cache: Path, device: str) -> dict:
    """k-NN of the same architecture at random init on the same images: the floor. One per
    (fraction, seed): the matchings of a seed share subset and initialisation."""
    from glsd.eval.runner import run_eval

    if cache.is_file():
        return json.loads(cache.read_text())
    result = run_eval("knn", run_dir, random_init=True, device=device)
    # Cells of one (fraction, seed) may compute it at once (--jobs): publish atomically.
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cache)
    return result


def cell_record(cfg: Config, cell: Cell, run_dir: Path, results: dict, wall: float) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "loss" in m][-1]
    subset = json.loads((run_dir / "subset.json").read_text())
    knn = results.get("knn", {}).get("results", {})
    record = {
        "name": cell.name, "status": "done", "config_hash": config_hash(cfg),
        "fraction": cell.fraction, "n_images": subset["n_images"], "matching": cell.matching,
        "seed": cell.seed, "epochs": cfg.train.epochs, "steps": last["step"],
        "images_seen": last["step"] * cfg.train.batch_size, "wall_time_s": round(wall, 1),
        "knn_top1": knn.get("top1"), "knn_top5": knn.get("top5"),
        "knn_floor_top1": results["knn_random_init"]["results"]["top1"],
        "final": {k: last[k] for k in ("loss", "loss_global", "loss_local", "geo_valid_frac",
                                        "sim_geo_agree", "sim_dist_cells") if k in last},
        "run_dir": str(run_dir),
    }
    if "linear" in results:
        record["linear_top1"] = results["linear"]["results"]["top1"]
    if "dense" in results:
        record["dense_within_one"] = results["dense"]["results"]["within_one"]
    return record


# ------------------------------------------------------------------------------------------
# Report

def write_outputs(out: Path, records: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps(records, indent=2))
    (out / "report.md").write_text(report_markdown(records))
    done = [r for r in records if r.get("status") == "done"]
    if done:
        try:
            plot_report(done, out / "report.png")
        except ImportError:
            print("[study] matplotlib missing: no report.png (pip install glsd[viz])")


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict], key: str = "knn_top1") -> dict:
    """{fraction: {matching: {"mean", "std", "n", "per_seed": {seed: value}}}}."""
    table: dict = {}
    for r in records:
        if r.get("status") != "done":
            continue
        cell = table.setdefault(r["fraction"], {}).setdefault(r["matching"], {"per_seed": {}})
        cell["per_seed"][r["seed"]] = r[key]
    for row in table.values():
        for cell in row.values():
            cell["mean"], cell["std"] = mean_std(list(cell["per_seed"].values()))
            cell["n"] = len(cell["per_seed"])
    return table


def paired_margin(row: dict, a: str, b: str) -> Optional[dict]:
    """Mean paired difference a - b over the seeds both arms finished (same seed = same
    subset and init), and whether it "exceeds the seed spread": larger than the larger of
    the two arms' standard deviations, with every seed agreeing on the sign."""
    seeds = sorted(set(row[a]["per_seed"]) & set(row[b]["per_seed"]))
    diffs = [row[a]["per_seed"][s] - row[b]["per_seed"][s] for s in seeds]
    if not diffs:
        return None
    margin = statistics.fmean(diffs)
    spread = max(row[a]["std"], row[b]["std"])
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    clear = abs(margin) > spread and same_sign and len(diffs) > 1
    return {"margin": margin, "spread": spread, "clear": clear, "diffs": diffs}


def verdict(row: dict, digits: int = 2) -> str:
    """Which matching wins at one fraction, by how much, and whether it beats the spread.
    The rule is deliberately cautious: each arm's spread also holds the subset-to-subset
    variation that pairing by seed removes."""
    ranked = sorted(row, key=lambda m: -row[m]["mean"])
    best = ranked[0]
    if len(ranked) < 2:
        return f"only {best} has finished cells: no comparison yet"
    parts = [f"**{best}** wins"]
    for other in ranked[1:]:
        p = paired_margin(row, best, other)
        if p is None:
            continue
        f = f"{{:+.{digits}f}}"
        if len(p["diffs"]) == 1:
            parts.append(f"{f.format(p['margin'])} over {other} (one seed: no spread to compare with)")
            continue
        parts.append(f"{f.format(p['margin'])} over {other} ({'exceeds' if p['clear'] else 'within'} "
                     f"the seed spread of {p['spread']:.{digits}f}; per-seed differences "
                     f"{', '.join(f.format(d) for d in p['diffs'])})")
    return "; ".join(parts)


PAPER_CLAIMS = (("geometric", "similarity", "geometric matching beats similarity matching"),
                ("none", "similarity", "similarity matching is worse than global-only"))


def paper_claims(row: dict, digits: int = 2) -> list[str]:
    """The paper's two low-data claims, each checked at one fraction (paired by seed)."""
    out = []
    for a, b, claim in PAPER_CLAIMS:
        p = paired_margin(row, a, b) if a in row and b in row else None
        if p is None:
            continue
        holds = p["margin"] > 0
        if len(p["diffs"]) == 1:
            strength = "one seed: no spread to compare with"
        elif p["clear"]:
            strength = "beyond the seed spread" if holds else "the reverse is beyond the seed spread"
        else:
            strength = "within the seed spread"
        out.append(f"{claim}: {'holds' if holds else 'does not hold'} "
                   f"({a} - {b} = {p['margin']:+.{digits}f}, {strength})")
    return out


OTHER_EVALUATIONS = {
    "linear_top1": ("Linear probe top-1 (%)", 2),
    "dense_within_one": ("Dense correspondence: fraction of cells matched within one cell "
                         "(label-free, held-out test images; `glsd eval dense`)", 3),
}


def other_evaluations(records: list[dict], matchings: list[str]) -> list[str]:
    """A table and a verdict per fraction for each evaluation besides k-NN that was run."""
    lines: list[str] = []
    for key, (title, digits) in OTHER_EVALUATIONS.items():
        done = [r for r in records if r.get("status") == "done" and r.get(key) is not None]
        if not done:
            continue
        table = summarize(done, key)
        lines += ["", f"## {title}", "", "| fraction | " + " | ".join(matchings) + " |",
                  "|---|" + "---|" * len(matchings)]
        for frac in sorted(table):
            row = table[frac]
            cells = [f"{row[m]['mean']:.{digits}f} ± {row[m]['std']:.{digits}f} (n={row[m]['n']})"
                     if m in row else "-" for m in matchings]
            lines.append(f"| {frac:g} | " + " | ".join(cells) + " |")
        lines.append("")
        for frac in sorted(table):
            claims = "; ".join(paper_claims(table[frac], digits))
            lines.append(f"- fraction {frac:g}: {verdict(table[frac], digits)}."
                         + (f" Paper: {claims}." if claims else ""))
    return lines


def report_markdown(records: list[dict]) -> str:
    table = summarize(records)
    floors = summarize(records, "knn_floor_top1")
    matchings = [m for m in ("none", "similarity", "geometric")
                 if any(m in row for row in table.values())]
    lines = ["# Low-data study: k-NN top-1 (%) by data fraction and matching", "",
             "Mean ± std over seeds (k=20, T=0.07, teacher backbone, labelled train images = the "
             "pretraining subset, full test split). Floor: the same backbone at random init.", "",
             "| fraction | images | floor | " + " | ".join(matchings) + " |",
             "|---|---|---|" + "---|" * len(matchings)]
    n_images = {r["fraction"]: r["n_images"] for r in records if r.get("status") == "done"}
    for frac in sorted(table):
        row = table[frac]
        floor = mean_std([v for m in floors[frac].values() for v in m["per_seed"].values()])
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f} (n={row[m]['n']})" if m in row else "-"
                 for m in matchings]
        lines.append(f"| {frac:g} | {n_images.get(frac, '?')} | {floor[0]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict per fraction", "",
              "A comparison only means something when every arm learns: the bar is the "
              "global-only (none) arm at least 10 points above the floor.", ""]
    for frac in sorted(table):
        floor = mean_std([v for m in floors[frac].values() for v in m["per_seed"].values()])[0]
        lift = table[frac]["none"]["mean"] - floor if "none" in table[frac] else math.nan
        bar = "met" if lift >= 10 else "NOT met: read the comparison with care"
        claims = "; ".join(paper_claims(table[frac]))
        lines.append(f"- fraction {frac:g}: {verdict(table[frac])}. Global-only arm vs floor: "
                     f"{lift:+.2f} points ({bar})." + (f" Paper: {claims}." if claims else ""))
    lines += other_evaluations(records, matchings)
    lines += ["", "## Matching diagnostics at the end of training", "",
              "How often the similarity match equals the geometric match (among cells with a valid "
              "geometric match), and the mean distance of similarity matches from the true "
              "location, in teacher cells; computed in every arm.", "",
              "| fraction | matching | sim = geo | sim distance (cells) | valid geometric matches |",
              "|---|---|---|---|---|"]
    for frac in sorted(table):
        for m in matchings:
            rs = [r for r in records if r.get("status") == "done" and r["fraction"] == frac and r["matching"] == m]
            if rs:
                agree = mean_std([r["final"].get("sim_geo_agree") for r in rs])[0]
                dist = mean_std([r["final"].get("sim_dist_cells") for r in rs])[0]
                valid = mean_std([r["final"].get("geo_valid_frac") for r in rs])[0]
                lines.append(f"| {frac:g} | {m} | {agree:.3f} | {dist:.2f} | {valid:.3f} |")
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed cells", ""] + [f"- {r['name']}: {r['error']}" for r in failed]
    missing = [r["name"] for r in records if r.get("status") == "not run"]
    if missing:
        lines += ["", "## Cells not run yet", "", ", ".join(missing)]
    return "\n".join(lines) + "\n"


def plot_report(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(records)
    floors = summarize(records, "knn_floor_top1")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    fracs = sorted(table)
    for m in ("none", "similarity", "geometric"):
        xs = [f for f in fracs if m in table[f]]
        if xs:
            ax.errorbar(xs, [table[f][m]["mean"] for f in xs], yerr=[table[f][m]["std"] for f in xs],
                        marker="o", capsize=4, label=m)
    floor = [mean_std([v for c in floors[f].values() for v in c["per_seed"].values()])[0] for f in fracs]
    ax.plot(fracs, floor, "k--", label="random init (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of CIFAR-10 train used for pretraining")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_xticks(fracs, [f"{f:g}" for f in fracs])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
