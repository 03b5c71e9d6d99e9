"""The low-data study: pretrain + evaluate every (fraction, matching, seed) cell, then report.

Each cell lives in its own run folder under the study folder, so the study resumes for free:
a cell whose ``cell.json`` says done is skipped, an interrupted one resumes from its
checkpoint, a failed one is recorded and the others go on.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from glsd.config import Config, absolute_path, from_dict, load_config, same_root, to_dict
from glsd.config_compare import diff_keys
from glsd.config_files import load_yaml
from glsd.data.sources import open_source
from glsd.errors import ConfigError, GlsdError, RunFolderBusy
from glsd.train import lock
from glsd.train.checkpoint import read_json_record
from glsd.tools.study_records import cell_record, collected_record, write_outputs
from glsd.utils.io import atomic_write_json, exclusive
from glsd.utils.process_pool import raise_if_stopped, run_stoppable
from glsd.train.signals import take_late_stop


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
    """The grid in order (fractions, then seeds, then arms); a value given twice counts once."""
    s = cfg.study
    once = lambda values: list(dict.fromkeys(values))  # noqa: E731 - first occurrence, order kept
    return [Cell(f, m, seed) for f in once(fractions or s.fractions)
            for seed in once(seeds or s.seeds) for m in once(matchings or s.matchings)]


def run_study(config: str, out: Path, overrides: Sequence[str] = (), fractions=None,
              matchings=None, seeds=None, evals=None, device: str = "auto",
              report_only: bool = False, jobs: int = 1) -> dict:
    """Run (or, with ``report_only``, only collect) every cell, then write the report.

    ``jobs`` > 1 trains that many cells at once in separate processes, the CPU's cores split
    between them (:func:`threads_per_job`): on a GPU box a small model leaves the device mostly
    idle, and on a small CPU one cell's small convolutions do not keep every core busy.
    """
    out = Path(absolute_path(str(out)))  # as pretrain expands each cell's output_dir
    base = load_config(config, overrides)
    evals = list(dict.fromkeys(evals or base.study.evals))
    cells = study_cells(base, fractions, matchings, seeds)
    if not report_only:
        check_cells(config, overrides, cells, out)
        check_evaluations(base, evals, out)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused study leaves no folder
    if report_only:
        records = [collected_record(out, cell) for cell in cells]
    else:
        atomic_write_json(out / "study.json", {
            "config": config, "overrides": list(overrides), "evals": evals,
            "cells": [c.name for c in cells]})
        # the cells left to train, not --jobs, share the cores: 2 cells of --jobs 4 get half each
        jobs = min(jobs, sum(collected_record(out, c)["status"] != "done" for c in cells))
        if jobs > 1:
            if base.data.download:  # once here, not by every worker at once into one file
                for split in {base.data.split, base.eval.test_split}:
                    open_source(base.data, split)
            records = run_cells_in_parallel(config, overrides, cells, out, evals, device, jobs)
        else:
            records = run_cells_in_order(config, overrides, cells, out, evals, device)
    records = write_outputs(out, records)
    return {"records": records, "out": str(out)}


def device_override(device: str) -> list[str]:
    return [] if device == "auto" else [f"device={device}"]


def check_cells(config, overrides, cells: list[Cell], out: Path) -> None:
    """Every cell's config and its training preflight (data, grids, batch against subset
    size), before the first cell trains: a bad value in one cell (``--fractions 0.05 5``) or a
    missing ``data.root`` is refused now, not once per cell after hours of the others."""
    from glsd.train.preflight import preflight

    configs = []
    for cell in cells:
        try:
            configs.append(load_config(config, [*overrides, *cell.overrides(out)]))
        except ConfigError as e:
            raise ConfigError(f"study cell {cell.name}: {e}") from None
    sources, warned = {}, set()  # cells differ in subset, not in data: open each source once
    for cell, cfg in zip(cells, configs):
        key = (cfg.data.source, cfg.data.root, cfg.data.split, cfg.data.download)
        if key not in sources:
            sources[key] = open_source(cfg.data)
        try:
            _, plan = preflight(with_step_budget(cfg, sources[key]), sources[key])
        except ConfigError as e:
            raise ConfigError(f"study cell {cell.name}: {e}") from None
        check_finished_cell(cfg, out / cell.name)
        n, classes = plan.num_images, len(sources[key].classes)  # the subset preflight drew
        if n < classes and cell.fraction not in warned:
            warned.add(cell.fraction)
            print(f"[study] note: fraction {cell.fraction:g} pretrains on {n} images of {classes} "
                  "classes: its k-NN and probes score against a bank that misses classes", flush=True)


# The settings a finished cell's results depend on, besides the schedule (checked by preflight).
RESULT_SECTIONS = ("data", "crops", "model", "loss", "eval")


def check_finished_cell(cfg: Config, run_dir: Path) -> None:
    """A cell finished under other settings in this --out is refused before any cell trains:
    reusing its record would mix two studies in one report."""
    record = read_json_record(run_dir / "cell.json")
    if record is None or record.get("status") != "done":
        return
    changed = changed_settings(read_run_config(run_dir), cfg, RESULT_SECTIONS)
    if changed:
        raise ConfigError(f"{run_dir} holds this cell made under other settings "
                          f"({'; '.join(changed[:4])}); use another --out, or delete that "
                          "folder to redo the cell")


def check_evaluations(cfg: Config, evals: list[str], out: Path) -> None:
    """The images the evaluations read, before any cell trains: labelled train images and a
    held-out labelled test split (every cell scores the k-NN floor; k-NN, linear and seg need
    them too; dense reads the test split). A folder they cannot use is refused now, not after
    every cell has trained."""
    from glsd.eval.eval_data import eval_sources

    try:
        eval_sources(cfg, out, purpose=f"the study's k-NN floor and evaluations ({', '.join(evals)})",
                     other_set_hint=False)
    except ConfigError as e:
        raise ConfigError(f"{e}; the study compares arms on labelled, held-out images") from None


def run_cells_in_order(config, overrides, cells, out, evals, device) -> list[dict]:
    records, spent, ran = [], 0.0, 0
    for i, cell in enumerate(cells):
        print(f"[study] cell {i + 1}/{len(cells)}: {cell.name}", flush=True)
        start = time.time()
        done_before = collected_record(out, cell)["status"] == "done"
        records.append(run_cell(config, overrides, cell, out, evals, device))
        write_outputs(out, records)
        if not done_before and records[-1].get("status") == "done":  # trained here, whole
            spent, ran = spent + time.time() - start, ran + 1
        left = sum(collected_record(out, c)["status"] != "done" for c in cells[i + 1:])
        print(f"[study] {cell.name}: {cell_summary(records[-1])}"
              + (f"; {left} cell{'s' if left > 1 else ''} left, about {format_duration(spent / ran * left)}"
                 if ran and left else ""), flush=True)
    return records


def cell_summary(record: dict) -> str:
    """One line of a cell's results (or its failure) for the console."""
    if record.get("status") != "done":
        return f"{record.get('status')}" + (f" ({record['error']})" if record.get("error") else "")
    parts = [f"k-NN {record['knn_top1']:.2f} (floor {record['knn_floor_top1']:.2f})"
             if record.get("knn_top1") is not None and record.get("knn_floor_top1") is not None else None]
    parts += [f"{name} {record[key]:.{digits}f}" for key, name, digits in (
        ("linear_top1", "linear", 2), ("dense_within_one", "dense", 3), ("seg_accuracy", "seg", 3))
        if record.get(key) is not None]
    return "done: " + ", ".join(p for p in parts if p)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def threads_per_job(jobs: int) -> Optional[int]:
    """Torch threads for each of ``jobs`` concurrent cells: the cores this process may use,
    split between them. Each cell would otherwise take every core, and ``jobs`` of them
    oversubscribe the CPU. None (torch's default) where the user set OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


def run_cells_in_parallel(config, overrides, cells, out, evals, device, jobs) -> list[dict]:
    """The same cells, ``jobs`` at a time, each in its own process; a stop signal stops them
    all (each training cell after its checkpoint) and starts no other. Records keep the grid's
    order whatever finishes first."""
    records = [collected_record(out, cell, status="running") for cell in cells]
    threads = threads_per_job(jobs)
    print(f"[study] {len(cells)} cells, {jobs} at a time"
          + (f", {threads} torch thread{'s' if threads > 1 else ''} each" if threads else ""), flush=True)

    def finished(i: int, record: dict) -> None:
        records[i] = record
        print(f"[study] {cells[i].name}: {cell_summary(record)}", flush=True)
        write_outputs(out, records)

    run_stoppable(run_cell, [(config, list(overrides), cell, out, evals, device) for cell in cells],
                  jobs, threads, finished)
    return records


def run_cell(config: str, overrides: Sequence[str], cell: Cell, out: Path, evals: list[str],
             device: str) -> dict:
    # --device is the whole cell's: training too, not only its evaluations
    cfg = load_config(config, [*overrides, *cell.overrides(out), *device_override(device)])
    run_dir = Path(cfg.output_dir)
    try:
        lock.acquire(run_dir, "study cell")  # another study on this folder: leave the cell to it
    except RunFolderBusy as e:
        print(f"[study] {cell.name}: skipped, {e}", flush=True)
        return {"name": cell.name, "fraction": cell.fraction, "matching": cell.matching,
                "seed": cell.seed, "status": "busy", "error": str(e)}
    try:
        return _run_locked_cell(cfg, cell, out, evals, device, run_dir)
    finally:
        lock.release(run_dir)


def _run_locked_cell(cfg: Config, cell: Cell, out: Path, evals: list[str], device: str,
                     run_dir: Path) -> dict:
    from glsd.eval.runner import run_eval
    from glsd.train.pretrain import TrainingInterrupted, pretrain

    record_path = run_dir / "cell.json"
    if record_path.exists():
        record = read_json_record(record_path)
        if record is not None and record.get("status") == "done":
            check_finished_cell(cfg, run_dir)  # checked before the study too; the folder may have changed
            return record
        print(f"[study] {cell.name}: {record_path} is torn or invalid; redoing the cell", flush=True)
        record_path.unlink()
    start = time.time()
    try:
        cfg = with_step_budget(cfg)
        take_late_stop()  # one left by an earlier run of this process is not this cell's
        pretrain(cfg)
        late = take_late_stop()  # a stop while the run was being written: it is complete
        if late is not None:
            raise TrainingInterrupted(f"stopped by signal {late} after training {cell.name} (its "
                                      "run is complete); rerun the study to evaluate it", late)
        raise_if_stopped()  # the parent of --jobs was told to stop meanwhile
        results = {kind: run_eval(kind, run_dir, device=device) for kind in evals}
        results["knn_random_init"] = knn_floor(cfg, run_dir, out / f"floor-f{cell.fraction:g}-s{cell.seed}.json", device)
        for kind in ("dense", "seg"):  # the dense evaluations' floors too, when they ran
            if kind in evals:
                results[f"{kind}_random_init"] = knn_floor(
                    cfg, run_dir, out / f"{kind}-floor-f{cell.fraction:g}-s{cell.seed}.json", device, kind=kind)
    except TrainingInterrupted:
        raise  # a signal stops the whole study; the cell resumes on the next run
    except Exception as e:  # noqa: BLE001 - one failed cell must not stop the grid
        if isinstance(e, GlsdError):  # bad input: its message says it all
            print(f"[study] {cell.name} failed: {e}", flush=True)
        else:
            traceback.print_exc()
        return {"name": cell.name, "fraction": cell.fraction, "matching": cell.matching,
                "seed": cell.seed, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    record = cell_record(cfg, cell, run_dir, results, time.time() - start)
    atomic_write_json(record_path, record)
    return record


def with_step_budget(cfg: Config, source=None) -> Config:
    """Give the cell about ``study.steps`` optimisation steps whatever its subset size: the
    whole number of epochs nearest to it (a schedule ends at an epoch's end), so cells of
    different fractions differ by up to half an epoch (CIFAR-10 at 100 %: 3,124 for 3,000)."""
    if cfg.study.steps is None:
        return cfg
    from glsd.data.subset import select_images

    n_images = len(select_images(cfg, None, source))
    steps_per_epoch = max(1, n_images // cfg.train.batch_size)
    epochs = max(1, round(cfg.study.steps / steps_per_epoch))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


def knn_floor(cfg: Config, run_dir: Path, cache: Path, device: str, kind: str = "knn") -> dict:
    """k-NN (or ``kind``) of the same architecture at random init on the same images: the
    floor. One per (fraction, seed): the matchings of a seed share subset and initialisation;
    a cached one made under other model, crop, data or eval settings is made again."""
    from glsd.eval.runner import run_eval

    # Cells of one (fraction, seed) finish together under --jobs: the second waits for the
    # first's floor instead of computing the same one beside it.
    with exclusive(cache.with_name(f".{cache.name}.lock")):
        cached = read_json_record(cache)  # torn or invalid: computed again
        if cached is not None and not changed_settings(cached.get("config"), cfg, ("data", "crops", "model", "eval")):
            return cached
        result = run_eval(kind, run_dir, random_init=True, device=device)
        atomic_write_json(cache, result)  # a reader without the lock never sees half a file
    return result


def read_run_config(run_dir: Path) -> Optional[dict]:
    """The raw config.yaml of a run folder, None when it has none (an archived cell)."""
    path = run_dir / "config.yaml"
    try:
        return load_yaml(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {"unreadable": True}


def changed_settings(recorded: Optional[dict], cfg: Config, sections: Sequence[str]) -> list[str]:
    """Keys of ``sections`` whose recorded value differs from ``cfg``'s; empty when nothing
    is recorded (archived cells keep no config)."""
    if recorded is None:
        return []
    try:
        old = to_dict(from_dict(recorded))
    except ConfigError as e:
        return [f"a config this version cannot read ({e})"]
    new = to_dict(cfg)
    for d in (old, new):  # the folder, not how its path was written
        d["data"]["root"] = same_root(d["data"]["root"])
    return diff_keys({k: old[k] for k in sections}, {k: new[k] for k in sections})
