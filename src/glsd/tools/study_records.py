"""A study's records and reports: each cell's record read from its run folder, and the
study folder's results.json, report.md and report.png written from every finished cell."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from glsd.config import Config
from glsd.config_compare import config_hash
from glsd.data.subset import SUBSET_FILE
from glsd.train.checkpoint import read_json_record
from glsd.train.run_folder import read_metrics_records
from glsd.tools.study_plot import plot_report
from glsd.tools.study_report import report_markdown
from glsd.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from glsd.tools.study import Cell


def collected_record(out: Path, cell: Cell, status: str = "not run") -> dict:
    record = read_json_record(out / cell.name / "cell.json")  # torn or invalid: not done
    if record is not None and record.get("status") == "done":
        return record
    return {"name": cell.name, "fraction": cell.fraction, "matching": cell.matching,
            "seed": cell.seed, "status": status}


def cell_record(cfg: Config, cell: Cell, run_dir: Path, results: dict, wall: float) -> dict:
    last = [m for m in read_metrics_records(run_dir / "metrics.jsonl") if "loss" in m][-1]
    subset = json.loads((run_dir / SUBSET_FILE).read_text())
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
        # What the report states about the cells, read from the run (not assumed).
        "data": data_label(cfg), "knn_k": results.get("knn", {}).get("k", cfg.eval.k),
        # fewer training images than k: every image votes (the report says so)
        "knn_k_effective": results.get("knn", {}).get("k_effective"),
        "knn_temperature": results.get("knn", {}).get("temperature", cfg.eval.temperature),
    }
    if "knn" in results:  # what it evaluated, for the report to state
        record.update(eval_model=results["knn"].get("model"),
                      eval_train_fraction=results["knn"].get("train_fraction"),
                      max_test_images=results["knn"].get("max_test_images"))
    if "linear" in results:
        record["linear_top1"] = results["linear"]["results"]["top1"]
    if "dense" in results:
        record["dense_within_one"] = results["dense"]["results"]["within_one"]
        record["dense_floor_within_one"] = results["dense_random_init"]["results"]["within_one"]
    if "seg" in results:
        record["seg_accuracy"] = results["seg"]["results"]["accuracy"]
        record["seg_miou"] = results["seg"]["results"]["miou"]
        record["seg_floor_accuracy"] = results["seg_random_init"]["results"]["accuracy"]
        record["seg_floor_miou"] = results["seg_random_init"]["results"]["miou"]
    return record


def data_label(cfg: Config) -> str:
    """A short name of the pretraining images for the report: "cifar10-jpg.zip (train)"."""
    d = cfg.data
    name = Path(d.root).name if d.source in ("auto", "imagefolder", "folder", "zip") else d.source
    return f"{name} ({d.split})"


def with_other_finished_cells(out: Path, records: list[dict]) -> list[dict]:
    """The grid's records, then every other finished cell the study folder holds (a seed run
    for some arms only, an earlier ``--fractions``): the report covers the whole folder,
    whichever grid the last call named."""
    named = {r["name"] for r in records}
    others = []
    for path in sorted(out.glob("*/cell.json")):
        if path.parent.name in named:
            continue
        record = read_json_record(path)  # torn or invalid: left out
        if record is not None and record.get("status") == "done":
            others.append(record)
    return records + others


def write_outputs(out: Path, records: list[dict]) -> list[dict]:
    """results.json, report.md and report.png of the study folder; returns the records written."""
    records = with_other_finished_cells(out, records)
    atomic_write_json(out / "results.json", records)
    atomic_write_text(out / "report.md", report_markdown(records))
    if any(r.get("status") == "done" for r in records):
        try:  # every record: the picture states which cells are not run yet
            plot_report(records, out / "report.png")
        except ImportError:
            print("[study] matplotlib missing: no report.png (pip install glsd[viz])")
    return records
