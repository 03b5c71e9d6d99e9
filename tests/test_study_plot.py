"""report.png: a panel per recorded metric and the grid of verdicts beside or under them."""
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from glsd.tools.study_plot import plot_report, present_metrics, verdict_grid  # noqa: E402

# {fraction: {arm: per-seed k-NN top-1}}: 0.05 geometric clearly above similarity and
# similarity below none, hybrid clearly the best; 0.1 geometric clearly below similarity, no
# none cell, no new arm; 0.5 geometric and similarity overlap, soft_geometric one seed only.
GRID = {
    0.05: {"none": (35, 36, 37), "similarity": (30, 31, 32), "geometric": (40, 41, 42),
           "hybrid": (45, 46, 47)},
    0.1: {"similarity": (40, 41, 42), "geometric": (30, 31, 32)},
    0.5: {"none": (30, 31, 32), "similarity": (34, 35, 33), "geometric": (35, 33, 37),
          "soft_geometric": (50,)},
}


def _records(dense: bool) -> list[dict]:
    records = []
    for frac, arms in GRID.items():
        for arm, values in arms.items():
            for seed, v in enumerate(values):
                r = {"name": f"f{frac:g}-{arm}-s{seed}", "status": "done", "fraction": frac,
                     "matching": arm, "seed": seed, "knn_top1": float(v), "knn_floor_top1": 10.0 + seed,
                     "n_images": 100, "data": "synthetic (train)"}
                if dense and frac != 0.5:  # the dense evaluations ran at two fractions only
                    r.update(dense_within_one=v / 100, dense_floor_within_one=0.2,
                             seg_accuracy=v / 200, seg_floor_accuracy=0.1,
                             seg_miou=v / 400, seg_floor_miou=0.05)
                records.append(r)
    for seed in range(3):  # a fraction of the grid with no finished cell, and a failed cell
        records.append({"name": f"f1-none-s{seed}", "fraction": 1.0, "matching": "none",
                        "seed": seed, "status": "not run"})
    records.append({"name": "f0.1-none-s0", "fraction": 0.1, "matching": "none", "seed": 0,
                    "status": "failed", "error": "RuntimeError: boom"})
    return records


def _grid(records) -> dict:
    """{(row label, fraction): (verdict, text)}."""
    labels, fractions, cells = verdict_grid(records)
    return {(label, frac): cell for label, row in zip(labels, cells) for frac, cell in zip(fractions, row)}


def test_verdict_grid_states_the_papers_claims_per_fraction_as_measured():
    labels, fractions, _ = verdict_grid(_records(dense=False))
    assert labels == ["k-NN: geometric > similarity", "k-NN: similarity < none",
                      "k-NN: best new > best of 3"]
    assert fractions == [0.05, 0.1, 0.5, 1.0]
    grid = _grid(_records(dense=False))
    claim1, claim2, new = labels
    assert grid[claim1, 0.05] == ("holds beyond", "+10.00")  # beyond the spread of 1.00
    assert grid[claim2, 0.05] == ("holds beyond", "+5.00")  # none - similarity
    assert grid[new, 0.05] == ("holds beyond", "hyb-geo +5.00")
    assert grid[claim1, 0.1] == ("does not hold beyond", "-10.00")
    assert grid[claim2, 0.1] == ("not run", "not run")  # its only none cell failed
    assert grid[new, 0.1] == ("not run", "not run")  # no new arm ran
    assert grid[claim1, 0.5] == ("holds", "+1.00")  # within the seed spread of 2.00
    assert grid[claim2, 0.5] == ("does not hold beyond", "-3.00")
    assert grid[new, 0.5] == ("holds", "soft-geo +15.00 (1 seed)")  # one seed: never "beyond"
    assert all(grid[label, 1.0] == ("not run", "not run") for label in labels)


def test_verdict_grid_covers_every_recorded_metric():
    records = _records(dense=True)
    assert [m[0] for m in present_metrics(records)] == [
        "knn_top1", "dense_within_one", "seg_accuracy", "seg_miou"]
    labels, _, _ = verdict_grid(records)
    assert [label.split(":")[0] for label in labels[::3]] == ["k-NN", "dense", "seg acc", "seg mIoU"]
    grid = _grid(records)
    assert grid["dense: geometric > similarity", 0.05] == ("holds beyond", "+0.100")
    assert grid["dense: geometric > similarity", 0.5] == ("not run", "not run")
    tie = [dict(r, knn_top1=30.001 if r["matching"] == "geometric" else 30.0) for r in records
           if r.get("status") == "done" and r["fraction"] == 0.05 and r["matching"] in ("geometric", "similarity")]
    assert _grid(tie)["k-NN: geometric > similarity", 0.05] == ("a tie", "+0.00")


@pytest.mark.parametrize("dense", [False, True])
def test_report_png_draws_a_panel_per_metric_on_a_partial_grid(tmp_path, dense):
    path = tmp_path / "report.png"
    plot_report(_records(dense), path)
    assert path.stat().st_size > 20_000  # panels and text, not an empty canvas
    image = imread(path)
    height, width = image.shape[:2]
    assert width > (1500 if dense else 500)  # three panels a row with dense/seg, one without
    assert height > width / 3 or not dense
    assert image[..., :3].std() > 0.05  # something was drawn


def test_report_png_needs_a_finished_cell(tmp_path):
    with pytest.raises(ValueError, match="no finished cell"):
        plot_report([{"fraction": 0.1, "matching": "none", "seed": 0, "status": "not run"}],
                    tmp_path / "report.png")
