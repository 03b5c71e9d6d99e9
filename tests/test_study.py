"""The study command end to end on a 2 x 2 micro grid of synthetic data."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from glsd.config import ConfigError
from glsd.tools import study as study_mod
from glsd.tools.study import Cell, run_study
from glsd.tools.study_report import report_markdown, summarize, verdict

TINY = [
    "data.source=synthetic", "data.synthetic_num_images=32", "data.synthetic_num_classes=4",
    "data.num_workers=0", "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
    "model.backbone=glsd_convnet", "model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "train.batch_size=8", "train.epochs=1", "train.precision=fp32", "train.progress=false",
    "train.log_every=1", "eval.batch_size=16", "eval.dense_num_images=4", "device=cpu",
    "eval.k=5", "eval.temperature=0.1",
]


def _table_cells(report: str) -> dict:
    """{(fraction, matching): mean} parsed from the report's markdown table."""
    lines = [l for l in report.splitlines() if l.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:
        parts = [p.strip() for p in line.strip("|").split("|")]
        if not re.match(r"^[0-9.]+$", parts[0]) or len(parts) != len(header):
            break
        for name, value in zip(header[3:], parts[3:]):
            if value != "-":
                cells[(float(parts[0]), name)] = float(value.split()[0])  # "m ± s (n=k)", "m (1 seed)"
    return cells


def test_micro_grid_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    run_study(None, out, TINY, fractions=[0.5, 1.0], matchings=["none", "geometric"],
                       seeds=[0], evals=["knn"], device="cpu")
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4 and all(r["status"] == "done" for r in records), records
    assert {(r["fraction"], r["matching"]) for r in records} == {
        (0.5, "none"), (0.5, "geometric"), (1.0, "none"), (1.0, "geometric")}
    assert {r["n_images"] for r in records} == {16, 32}
    for r in records:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["knn_floor_top1"] <= 100
        assert set(r["final"]) >= {"loss", "loss_global", "loss_local", "sim_geo_agree"}
    report = (out / "report.md").read_text()
    # The stated settings are the run's (TINY evaluates at k=5, T=0.1), not hard-coded defaults.
    assert "k=5, T=0.1" in report and "Data: synthetic (train)" in report
    table = _table_cells(report)
    assert table == {(r["fraction"], r["matching"]): pytest.approx(r["knn_top1"], abs=0.006)
                     for r in records}
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun skips finished cells: their records (and wall times) are reused untouched.
    before = {r["name"]: r["wall_time_s"] for r in records}
    run_study(None, out, TINY, fractions=[0.5, 1.0], matchings=["none", "geometric"], seeds=[0],
              evals=["knn"], device="cpu")
    again = json.loads((out / "results.json").read_text())
    assert {r["name"]: r["wall_time_s"] for r in again} == before

    # --report-only trains nothing: a grid with an unrun fraction lists its cells as not run.
    run_study(None, out, TINY, fractions=[0.25, 0.5, 1.0], matchings=["none", "geometric"],
              seeds=[0], report_only=True)
    status = {r["name"]: r["status"] for r in json.loads((out / "results.json").read_text())}
    assert status["f0.25-none-s0"] == "not run" and status["f1-geometric-s0"] == "done"
    assert not (out / "f0.25-none-s0").exists()
    assert "f0.25-geometric-s0" in (out / "report.md").read_text()


def test_a_folder_the_evaluations_cannot_use_is_refused_before_any_cell_trains(tmp_path):
    """Class folders but no held-out split: k-NN has nothing to score on. Said before the
    first cell, naming --evals (not glsd eval's --train-data), and no study folder is left."""
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(tmp_path / "photos" / c / f"{i}.png")
    out = tmp_path / "study"
    overrides = [*TINY, "data.source=auto", f"data.root={tmp_path / 'photos'}"]
    for evals in (["knn"], ["dense"]):  # every cell scores the k-NN floor, whatever --evals says
        with pytest.raises(ConfigError, match=r"no 'test' split folder.*labelled, held-out images") as err:
            run_study(None, out, overrides, fractions=[1.0], matchings=["none"], seeds=[0], evals=evals, device="cpu")
        assert "--train-data" not in str(err.value) and not out.exists()


def test_a_fraction_with_fewer_images_than_classes_is_noted(tmp_path, capsys):
    from glsd.tools.study import check_cells

    cells = [Cell(0.1, "none", 0), Cell(0.1, "geometric", 0), Cell(1.0, "none", 0)]
    check_cells(None, [*TINY, "train.batch_size=2"], cells, tmp_path / "s")
    notes = [l for l in capsys.readouterr().out.splitlines() if "[study] note" in l]
    assert notes == ["[study] note: fraction 0.1 pretrains on 3 images of 4 classes: its k-NN and "
                     "probes score against a bank that misses classes"]


def test_a_value_given_twice_is_one_cell():
    from glsd.config import load_config
    from glsd.tools.study import study_cells

    cells = study_cells(load_config(None, TINY), fractions=[1.0, 1.0], matchings=["none", "none"], seeds=[0, 0])
    assert [c.name for c in cells] == ["f1-none-s0"]


def test_failed_cell_is_reported_and_others_go_on(tmp_path, monkeypatch, capsys):
    import glsd.train.pretrain as pretrain_module

    real = pretrain_module.pretrain

    def fails_at_half(cfg):  # a failure no preflight can see (a crash mid-training)
        if cfg.data.fraction == 0.5:
            raise RuntimeError("simulated crash")
        return real(cfg)

    monkeypatch.setattr(pretrain_module, "pretrain", fails_at_half)
    out = tmp_path / "study"
    result = run_study(None, out, [*TINY, "train.batch_size=8"], fractions=[0.5, 1.0],
                       matchings=["none"], seeds=[0], evals=["knn"], device="cpu")
    status = {r["name"]: r["status"] for r in result["records"]}
    assert status == {"f0.5-none-s0": "failed", "f1-none-s0": "done"}
    assert "simulated crash" in (out / "report.md").read_text()
    console = capsys.readouterr().out  # each cell's result, and the time the rest will take
    assert "[study] f0.5-none-s0: failed (RuntimeError: simulated crash)\n" in console  # no estimate from it
    assert re.search(r"\[study\] f1-none-s0: done: k-NN [0-9.]+ \(floor [0-9.]+\)\n", console), console


def test_a_cell_the_preflight_refuses_stops_the_study_before_any_trains(tmp_path):
    out = tmp_path / "study"
    # batch 24 > the 16 images of the 0.5 cell: refused up front, though the 1.0 cell is listed first
    with pytest.raises(ConfigError, match=r"study cell f0.5-none-s0: 16 images are fewer than one global batch"):
        run_study(None, out, [*TINY, "train.batch_size=24"], fractions=[1.0, 0.5],
                  matchings=["none"], seeds=[0], evals=["knn"], device="cpu")
    assert not list(out.glob("f*"))  # no cell folder: nothing trained


def test_a_study_with_no_data_is_refused_before_any_cell(tmp_path):
    with pytest.raises(ConfigError, match="data.root is empty"):
        run_study("cifar10-lowdata-cpu", tmp_path / "study", [], fractions=[0.05, 1.0],
                  matchings=["none"], seeds=[0], evals=["knn"], device="cpu")
    assert not list((tmp_path / "study").glob("f*"))


def _rec(fraction, matching, seed, top1):
    return {"status": "done", "fraction": fraction, "matching": matching, "seed": seed,
            "knn_top1": top1, "knn_floor_top1": 10.0, "n_images": 100,
            "final": {"sim_geo_agree": 0.5, "sim_dist_cells": 1.0, "geo_valid_frac": 0.9}}


def test_summary_and_verdict_maths():
    records = [_rec(0.1, "none", 0, 30.0), _rec(0.1, "none", 1, 32.0),
               _rec(0.1, "geometric", 0, 35.0), _rec(0.1, "geometric", 1, 36.0),
               _rec(0.1, "similarity", 0, 36.0), _rec(0.1, "similarity", 1, 30.0)]
    table = summarize(records)[0.1]
    assert table["none"]["mean"] == 31.0 and table["none"]["std"] == pytest.approx(2 ** 0.5)
    text = verdict(table)
    assert text.startswith("**geometric** leads")
    assert "+4.50 over none (beyond the seed spread of 1.41" in text  # diffs +5, +4 > spread 1.41, same sign
    assert "+2.50 over similarity (within" in text  # diffs -1, +6: signs disagree
    assert "| 0.1 | 100 | 10.00 |" in report_markdown(records)
    with_steps = [dict(r, steps=3003 if r["fraction"] == 0.1 else 2964) for r in records]
    with_steps.append(dict(_rec(0.2, "none", 0, 40.0), steps=2964))
    assert "Optimisation steps per cell: 0.1: 3,003; 0.2: 2,964." in report_markdown(with_steps)


def test_equal_arms_tie_and_arms_under_their_floor_are_flagged():
    """One seed, two arms of the same value: a tie, not a lead of +0.00. An evaluation whose
    arms end under the random-init floor says so."""
    records = [_rec(0.1, "none", 0, 96.67), _rec(0.1, "geometric", 0, 96.67), _rec(0.1, "similarity", 0, 90.0)]
    text = verdict(summarize(records)[0.1])
    assert text.startswith("**none** and **geometric** tie at 96.67") or \
        text.startswith("**geometric** and **none** tie at 96.67"), text
    assert "+0.00" not in text and "+6.67 over similarity" in text
    # a tie is a margin that prints as zero, wherever the means fall against the rounding
    near = summarize([_rec(0.1, "none", 0, 54.1249), _rec(0.1, "geometric", 0, 54.1251)])[0.1]
    assert verdict(near).startswith("**geometric** and **none** tie at 54.13"), verdict(near)
    with_seg = [dict(r, seg_accuracy=v, seg_floor_accuracy=0.772)
                for r, v in zip(records, (0.727, 0.730, 0.80))]
    report = report_markdown(with_seg)
    assert "**Below the random-init floor** (0.772): none, geometric;" in report
    assert "Below the random-init floor" not in report.split("## Labelled dense probe")[0]


def test_the_report_says_when_a_bank_had_fewer_images_than_k():
    records = [dict(_rec(f, "none", 0, 40.0), knn_k=20, knn_temperature=0.07, knn_k_effective=e)
               for f, e in ((0.02, 2), (1.0, 20))]
    assert "k=20 (2 at fraction 0.02: fewer training images), T=0.07" in report_markdown(records)


def test_cell_overrides_pair_the_arms():
    a, b = Cell(0.1, "none", 3), Cell(0.1, "geometric", 3)
    seeds = [[o for o in c.overrides(Path("/x")) if "seed" in o] for c in (a, b)]
    assert seeds[0] == seeds[1] == ["train.seed=3", "data.subset_seed=3"]


def test_a_signal_stops_the_study_without_recording_the_cell(tmp_path, monkeypatch):
    import glsd.train.pretrain as pretrain_mod

    def interrupted(cfg):
        raise pretrain_mod.TrainingInterrupted("stopped by a signal at step 1")

    monkeypatch.setattr(pretrain_mod, "pretrain", interrupted)
    with pytest.raises(pretrain_mod.TrainingInterrupted):
        run_study(None, tmp_path / "s", TINY, fractions=[1.0], matchings=["none"], seeds=[0], device="cpu")
    assert not (tmp_path / "s" / "f1-none-s0" / "cell.json").exists()


def test_parallel_cells_give_the_same_records_as_sequential(tmp_path):
    """--jobs runs cells in spawned processes; a cell's result must not depend on it."""
    grid = dict(fractions=[1.0], matchings=["none", "geometric"], seeds=[0], evals=["knn"], device="cpu")
    run_study(None, tmp_path / "seq", TINY, **grid)
    run_study(None, tmp_path / "par", TINY, jobs=2, **grid)
    seq = json.loads((tmp_path / "seq" / "results.json").read_text())
    par = json.loads((tmp_path / "par" / "results.json").read_text())
    assert [r["name"] for r in par] == [r["name"] for r in seq]  # grid order kept
    for a, b in zip(seq, par):
        assert b["status"] == "done"
        assert b["knn_top1"] == a["knn_top1"] and b["knn_floor_top1"] == a["knn_floor_top1"]
        assert b["final"]["loss"] == pytest.approx(a["final"]["loss"], rel=1e-5)
    assert len(list((tmp_path / "par").glob("floor-*.json"))) == 1  # one floor per (fraction, seed)
    assert not list((tmp_path / "par").glob("*.tmp*"))


def test_parallel_cells_split_the_cores(monkeypatch):
    """--jobs N gives each cell its share of the cores (N cells of every core each oversubscribe
    the CPU); an OMP_NUM_THREADS the user set is theirs to keep."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study_mod.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert study_mod.threads_per_job(2) == 8
    assert study_mod.threads_per_job(3) == 5
    assert study_mod.threads_per_job(32) == 1  # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert study_mod.threads_per_job(2) is None


def test_report_tabulates_dense_when_run():
    records = [dict(_rec(0.1, m, s, 30.0), dense_within_one=v)
               for m, vals in (("none", (0.70, 0.72)), ("geometric", (0.90, 0.91))) for s, v in enumerate(vals)]
    text = report_markdown(records)
    assert "## Dense correspondence" in text
    assert "| 0.1 | 0.710 ± 0.014 (n=2) | 0.905 ± 0.007 (n=2) |" in text
    assert "- fraction 0.1: **geometric** leads; +0.195 over none (beyond the seed spread of 0.014" in text
    assert "Linear probe" not in text  # not run, not reported


def test_report_checks_the_papers_two_claims():
    records = [_rec(0.1, "none", 0, 30.0), _rec(0.1, "none", 1, 31.0),
               _rec(0.1, "similarity", 0, 33.0), _rec(0.1, "similarity", 1, 36.0),
               _rec(0.1, "geometric", 0, 36.0), _rec(0.1, "geometric", 1, 36.5)]
    text = report_markdown(records)
    assert ("geometric matching beats similarity matching: holds "
            "(geometric - similarity = +1.75, within the seed spread of") in text
    assert ("similarity matching is worse than global-only: does not hold "
            "(none - similarity = -4.00, beyond the seed spread of") in text
    one_seed = report_markdown([r for r in records if r["seed"] == 0])
    assert "(geometric - similarity = +3.00, one seed: no spread to compare with)" in one_seed
    tie = report_markdown([_rec(0.1, "geometric", 0, 30.001), _rec(0.1, "similarity", 0, 30.0)])
    assert "geometric matching beats similarity matching: a tie (geometric - similarity = +0.00" in tie


def test_cli_grid_lists_take_overrides_after_them():
    import argparse

    from glsd.commands import study_lists as _study_lists

    args = argparse.Namespace(overrides=["a.b=1"], fractions=["0.05", "0.1"], matchings=["geometric"],
                              seeds=["0", "1", "model.local_out_dim=256"], evals=None)
    _study_lists(args)
    assert args.fractions == [0.05, 0.1] and args.seeds == [0, 1] and args.matchings == ["geometric"]
    assert args.overrides == ["a.b=1", "model.local_out_dim=256"]
    with pytest.raises(ConfigError, match="--matchings 'geo' is not one of none, similarity, geometric, soft_geometric, hybrid"):
        _study_lists(argparse.Namespace(overrides=[], fractions=None, matchings=["geo"], seeds=None, evals=None))
    with pytest.raises(ConfigError, match="--seeds takes int values"):
        _study_lists(argparse.Namespace(overrides=[], fractions=None, matchings=None, seeds=["x"], evals=None))
    from helpers_tiny import cli

    assert cli(["study", "cpu-default", "--seeds", "x", "--out", "unused"]) == 2  # bad input: exit 2


def test_study_runs_the_seg_probe(tmp_path):
    """`--evals seg` trains the cell and records the labelled dense probe's scores."""
    out = tmp_path / "study"
    run_study(None, out, [*TINY, "eval.seg_num_train=8", "eval.seg_num_test=4", "eval.seg_steps=5"],
              fractions=[1.0], matchings=["none"], seeds=[0], evals=["seg"], device="cpu")
    (record,) = json.loads((out / "results.json").read_text())
    assert record["status"] == "done", record
    seg = json.loads((out / "f1-none-s0" / "eval" / "seg.json").read_text())["results"]
    floor = json.loads((out / "seg-floor-f1-s0.json").read_text())["results"]
    assert (record["seg_accuracy"], record["seg_miou"]) == (seg["accuracy"], seg["miou"])
    assert (record["seg_floor_accuracy"], record["seg_floor_miou"]) == (floor["accuracy"], floor["miou"])
    assert "## Labelled dense probe: cell accuracy" in (out / "report.md").read_text()


def test_study_records_the_dense_floor_and_draws_it(tmp_path):
    """`--evals dense` records the score and its random-init floor; report.png gets its panel."""
    out = tmp_path / "study"
    run_study(None, out, TINY, fractions=[1.0], matchings=["none"], seeds=[0], evals=["knn", "dense"],
              device="cpu")
    (record,) = json.loads((out / "results.json").read_text())
    assert record["status"] == "done", record
    dense = json.loads((out / "f1-none-s0" / "eval" / "dense.json").read_text())["results"]
    floor = json.loads((out / "dense-floor-f1-s0.json").read_text())["results"]
    assert (record["dense_within_one"], record["dense_floor_within_one"]) == (
        dense["within_one"], floor["within_one"])
    if importlib.util.find_spec("matplotlib"):
        from glsd.tools.study_plot import present_metrics

        assert [m[0] for m in present_metrics([record])] == ["knn_top1", "dense_within_one"]
        assert (out / "report.png").stat().st_size > 10_000


def test_report_gives_floors_of_dense_evaluations_and_no_spread_for_one_seed():
    # One seed: no "± 0.000" that reads like a measured spread. The dense table gets the floor
    # column the k-NN table has, the mean of its seeds' floors (every arm of a seed shares one).
    records = [dict(_rec(0.1, m, 0, 30.0), dense_within_one=v, dense_floor_within_one=0.5)
               for m, v in (("none", 0.70), ("geometric", 0.90))]
    records.append(dict(_rec(0.1, "none", 1, 31.0), dense_within_one=0.72, dense_floor_within_one=0.6))
    text = report_markdown(records)
    assert "| fraction | floor | none | geometric |" in text
    assert "| 0.1 | 0.550 | 0.710 ± 0.014 (n=2) | 0.900 (1 seed) |" in text


def test_unsettled_comparisons_name_the_arms_a_third_seed_needs():
    from glsd.tools.study_report import extra_seed_arms

    records = [_rec(0.1, "none", 0, 30.0), _rec(0.1, "none", 1, 31.0),
               _rec(0.1, "similarity", 0, 33.0), _rec(0.1, "similarity", 1, 36.0),
               _rec(0.1, "geometric", 0, 36.0), _rec(0.1, "geometric", 1, 36.5),
               _rec(0.1, "hybrid", 0, 40.0), _rec(0.1, "hybrid", 1, 41.0),
               # 0.2: every comparison beyond the spread; 0.5: one seed only
               _rec(0.2, "none", 0, 40.0), _rec(0.2, "none", 1, 40.5),
               _rec(0.2, "similarity", 0, 38.0), _rec(0.2, "similarity", 1, 38.2),
               _rec(0.2, "geometric", 0, 45.0), _rec(0.2, "geometric", 1, 45.3),
               _rec(0.5, "none", 0, 40.0), _rec(0.5, "geometric", 0, 40.1)]
    # 0.1: geometric - similarity = +1.75 (diffs +3, +0.5) is within similarity's spread of
    # 2.12; none - similarity = -4 and hybrid - geometric = +4.25 are beyond it.
    assert extra_seed_arms(records) == {0.1: ["similarity", "geometric"]}
    text = report_markdown(records)
    assert "## The study's questions still within the seed spread (k-NN)" in text
    assert "- fraction 0.1: geometric vs similarity" in text
    assert "fraction 0.2:" not in text.split("## The study's questions still within")[1].split("##")[0]
    settled = [r for r in records if r["fraction"] != 0.1]
    assert extra_seed_arms(settled) == {}
    assert "questions still within" not in report_markdown(settled)


def test_a_bad_cell_is_refused_before_any_cell_trains(tmp_path, monkeypatch):
    """`--fractions 0.05 5` (5 % typed as 5): refused naming the cell before the 0.05 cells
    train for hours, not by the last cell."""
    import glsd.train.pretrain as pretrain_mod
    from glsd.config import ConfigError, load_config

    monkeypatch.setattr(pretrain_mod, "pretrain", lambda cfg: pytest.fail("a cell trained"))
    with pytest.raises(ConfigError, match=r"study cell f5-none-s0: data.fraction=5.0 must be in \(0, 1\]"):
        run_study(None, tmp_path / "s", TINY, fractions=[0.5, 5.0], matchings=["none"], seeds=[0], device="cpu")
    with pytest.raises(ConfigError, match=r"study.fractions has 5.0: .*\(5 % is 0.05\)"):
        load_config(None, ["study.fractions=[0.05, 5]"])


def _write_cell(out, record):
    name = f"f{record['fraction']:g}-{record['matching']}-s{record['seed']}"
    (out / name).mkdir(parents=True)
    (out / name / "cell.json").write_text(json.dumps(dict(record, name=name)))


def test_the_report_covers_every_finished_cell_of_the_folder(tmp_path):
    """A third seed run for some arms only (study_cpu.sh's seed 2), or an earlier --fractions,
    is in results.json and the report, whichever grid the last call named."""
    out = tmp_path / "s"
    for seed, (none, geo) in enumerate([(30.0, 35.0), (31.0, 36.0), (32.0, 37.0)]):
        _write_cell(out, _rec(0.1, "none", seed, none))
        _write_cell(out, _rec(0.1, "geometric", seed, geo))
    _write_cell(out, _rec(0.3, "none", 0, 40.0))
    result = run_study(None, out, TINY, fractions=[0.1], matchings=["none", "geometric"], seeds=[0, 1],
                       report_only=True)
    names = [r["name"] for r in json.loads((out / "results.json").read_text())]
    assert names[:4] == ["f0.1-none-s0", "f0.1-geometric-s0", "f0.1-none-s1", "f0.1-geometric-s1"]
    assert set(names[4:]) == {"f0.1-none-s2", "f0.1-geometric-s2", "f0.3-none-s0"}
    assert len(result["records"]) == 7
    assert "| 0.1 | 100 | 10.00 | 31.00 ± 1.00 (n=3) | 36.00 ± 1.00 (n=3) |" in (out / "report.md").read_text()


def test_a_study_without_knn_reports_its_other_evaluations(tmp_path):
    records = [dict(_rec(0.1, m, s, None), dense_within_one=v, dense_floor_within_one=0.5)
               for m, vals in (("none", (0.70, 0.72)), ("geometric", (0.90, 0.91))) for s, v in enumerate(vals)]
    text = report_markdown(records)
    assert "k-NN was not among the evaluations" in text and "## Dense correspondence" in text
    assert "| 0.1 | 0.500 | 0.710 ± 0.014 (n=2) | 0.905 ± 0.007 (n=2) |" in text


def test_the_bar_without_a_global_only_arm_and_rankings_on_shared_seeds():
    # geometric has a third seed the others lack: on the shared seeds 0 and 1 hybrid leads.
    records = [_rec(0.1, "geometric", 0, 50.0), _rec(0.1, "geometric", 1, 50.0), _rec(0.1, "geometric", 2, 56.0),
               _rec(0.1, "hybrid", 0, 51.0), _rec(0.1, "hybrid", 1, 51.0)]
    text = report_markdown(records)
    assert "No global-only (none) arm: the bar was not measured." in text and "nan" not in text
    assert "- fraction 0.1: **hybrid** leads; +1.00 over geometric" in text
    assert "best new arm (hybrid) vs the best of none/similarity/geometric (geometric): +1.00" in text


def test_the_spread_is_over_the_paired_seeds_and_a_sign_split_is_named():
    from glsd.tools.study_report import evidence, paired_margin

    # geometric's third seed (alone, far off) widens its std to 3.46; on seeds 0 and 1 it is 0.
    row = summarize([_rec(0.1, "geometric", 0, 50.0), _rec(0.1, "geometric", 1, 50.0),
                     _rec(0.1, "geometric", 2, 56.0), _rec(0.1, "hybrid", 0, 51.0),
                     _rec(0.1, "hybrid", 1, 51.5)])[0.1]
    p = paired_margin(row, "hybrid", "geometric")
    assert p["spread"] == pytest.approx(0.3536, abs=1e-4) and p["clear"]
    # a margin above the spread that one seed contradicts is not "within" it
    split = summarize([_rec(0.1, m, seed, v) for m, values in
                       (("none", (50.0, 50.0, 50.0)), ("similarity", (47.0, 47.0, 50.1)))
                       for seed, v in enumerate(values)])[0.1]
    p = paired_margin(split, "none", "similarity")
    assert p["margin"] == pytest.approx(1.9667, abs=1e-4) and not p["clear"]
    assert evidence(p, 2) == "larger than the seed spread of 1.79, but the seeds disagree in sign"


def test_a_rerun_under_other_settings_refuses_the_folders_cells(tmp_path):
    """Finished cells are reused only under the settings they were made with: another eval.k
    (or model, loss, ...) is refused naming the key, not reported as the new setting's."""
    out = tmp_path / "s"
    grid = dict(fractions=[1.0], matchings=["none"], seeds=[0], evals=["knn"], device="cpu")
    run_study(None, out, TINY, **grid)
    floor = json.loads((out / "floor-f1-s0.json").read_text())
    with pytest.raises(ConfigError, match=r"under other settings \(eval.k: 5 -> 7\)"):
        run_study(None, out, [*TINY, "eval.k=7"], **grid)
    # ... before any other cell trains, wherever the finished cell stands in the grid
    with pytest.raises(ConfigError, match=r"f1-none-s0 holds this cell made under other settings"):
        run_study(None, out, [*TINY, "eval.k=7"], **{**grid, "fractions": [0.5, 1.0]})
    assert not (out / "f0.5-none-s0").exists()
    # The floor of another model is made again (no cell reuses the old one).
    (out / "f1-none-s0").rename(tmp_path / "old-cell")
    no_device = [o for o in TINY if not o.startswith("device=")]  # the flag alone says cpu
    run_study(None, out, [*no_device, "model.out_dim=32"], **grid)
    assert json.loads((out / "floor-f1-s0.json").read_text())["config"]["model"]["out_dim"] == 32
    assert floor["config"]["model"]["out_dim"] == 64
    cfg = yaml.safe_load((out / "f1-none-s0" / "config.yaml").read_text())
    assert cfg["device"] == "cpu"  # --device is the cell's, training included


def test_the_step_budget_gives_every_fraction_whole_epochs_of_about_study_steps():
    from glsd.config import load_config
    from glsd.tools.study import with_step_budget

    cfg = load_config(None, [*TINY, "study.steps=12"])  # 32 images, batch 8: 4 steps an epoch
    assert with_step_budget(cfg).train.epochs == 3
    half = load_config(None, [*TINY, "study.steps=12", "data.fraction=0.5"])  # 2 steps an epoch
    assert with_step_budget(half).train.epochs == 6
    assert with_step_budget(load_config(None, [*TINY, "study.steps=13"])).train.epochs == 3  # nearest
    unset = load_config(None, [*TINY, "study.steps=null", "train.epochs=7"])
    assert with_step_budget(unset) is unset


def test_a_floor_is_computed_once_by_cells_that_finish_together(tmp_path, monkeypatch):
    """Cells of one (fraction, seed) under --jobs: the second waits on the first's floor and
    reads it, instead of computing the same floor beside it."""
    import threading
    import time as time_mod

    from glsd.config import load_config
    from glsd.eval import runner

    calls = []

    def slow_floor(kind, run_dir, random_init, device):
        calls.append(kind)
        time_mod.sleep(0.5)  # the other cell asks meanwhile
        return {"results": {"top1": 12.5}, "config": None}

    monkeypatch.setattr(runner, "run_eval", slow_floor)
    cfg = load_config(None, TINY)
    cache = tmp_path / "floor-f1-s0.json"
    results = []
    cells = [threading.Thread(target=lambda: results.append(
        study_mod.knn_floor(cfg, tmp_path, cache, "cpu"))) for _ in range(2)]
    for cell in cells:
        cell.start()
    for cell in cells:
        cell.join()
    assert calls == ["knn"]
    assert [r["results"]["top1"] for r in results] == [12.5, 12.5]


def test_jobs_are_the_cells_left_to_train(tmp_path, monkeypatch):
    """--jobs 4 with two cells to train runs two at a time (their threads split by two, not
    four); with one cell it runs in order, with every core."""
    seen = []

    def parallel(config, overrides, cells, out, evals, device, jobs):
        seen.append(("parallel", jobs))
        return [study_mod.collected_record(out, c) for c in cells]

    def in_order(config, overrides, cells, out, evals, device):
        seen.append(("in order", 1))
        return [study_mod.collected_record(out, c) for c in cells]

    monkeypatch.setattr(study_mod, "run_cells_in_parallel", parallel)
    monkeypatch.setattr(study_mod, "run_cells_in_order", in_order)
    grid = dict(fractions=[1.0], seeds=[0], evals=["knn"], device="cpu", jobs=4)
    run_study(None, tmp_path / "two", TINY, matchings=["none", "geometric"], **grid)
    run_study(None, tmp_path / "one", TINY, matchings=["none"], **grid)
    assert seen == [("parallel", 2), ("in order", 1)]


def test_a_file_system_without_locks_computes_unlocked(tmp_path, monkeypatch):
    """flock failing (NFS without lockd, Lustre without -o flock) must not fail the cell: the
    floor is then computed without the lock, as on Windows."""
    import errno
    import fcntl

    from glsd.utils.io import exclusive

    def no_locks(handle, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with exclusive(tmp_path / ".floor.lock"):
        ran.append(True)
    assert ran == [True]


def test_a_stop_while_the_run_is_written_stops_the_study_before_its_evaluations(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM during the export after the last step: the run completes (a signal
    waits for the export), but the study must stop there, not evaluate and go on."""
    import os
    import signal as signal_mod

    from glsd.train import pretrain as pretrain_mod

    finish = pretrain_mod._finish_run

    def finish_then_signalled(ctx, state):
        finish(ctx, state)
        os.kill(os.getpid(), signal_mod.SIGTERM)  # taken by the run's handler: no stop at once

    monkeypatch.setattr(pretrain_mod, "_finish_run", finish_then_signalled)
    with pytest.raises(pretrain_mod.TrainingInterrupted, match="its run is complete"):
        run_study(None, tmp_path / "s", TINY, fractions=[1.0], matchings=["none"], seeds=[0],
                  evals=["knn"], device="cpu")
    cell = tmp_path / "s" / "f1-none-s0"
    assert (cell / "backbone.safetensors").exists()  # trained and written
    assert not (cell / "cell.json").exists() and not (cell / "eval").exists()
