"""report.png: a panel per recorded metric and the verdicts it draws under them."""
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from glsd.tools.study_plot import plot_report, present_metrics, verdict_text  # noqa: E402

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


def test_verdicts_state_the_papers_claims_per_fraction_as_measured():
    text = verdict_text(_records(dense=False))
    assert text[0] == "k-NN top-1 (%):"
    assert ("  fraction 0.05: geometric matching beats similarity matching: holds "
            "(geometric - similarity = +10.00, beyond the seed spread of 1.00)") in text
    assert ("  fraction 0.05: similarity matching is worse than global-only: holds "
            "(none - similarity = +5.00, beyond the seed spread of 1.00)") in text
    assert ("  fraction 0.05: best new arm (hybrid) vs the best of none/similarity/geometric "
            "(geometric): +5.00 (beyond the seed spread of 1.00)") in text
    assert ("  fraction 0.1: geometric matching beats similarity matching: does not hold "
            "(geometric - similarity = -10.00, beyond the seed spread of 1.00)") in text
    assert ("  fraction 0.1: similarity matching is worse than global-only: not run "
            "(no finished none cell)") in text  # its only none cell failed
    assert "  fraction 0.1: best new arm vs the best of none/similarity/geometric: not run" in text
    assert ("  fraction 0.5: geometric matching beats similarity matching: holds "
            "(geometric - similarity = +1.00, within the seed spread of 2.00)") in text
    assert any(line.startswith("  fraction 0.5: best new arm (soft_geometric)")
               and "one seed: no spread to compare with" in line for line in text)
    assert "  fraction 1: not run" in text
    assert not any("dense" in line for line in text)  # not recorded: no verdict on it


def test_verdicts_cover_every_recorded_metric():
    records = _records(dense=True)
    assert [m[0] for m in present_metrics(records)] == [
        "knn_top1", "dense_within_one", "seg_accuracy", "seg_miou"]
    text = verdict_text(records)
    titles = [line for line in text if not line.startswith(" ")]
    assert titles == ["k-NN top-1 (%):", "dense correspondence: within one cell:",
                      "labelled dense probe: cell accuracy:", "labelled dense probe: mIoU:"]
    dense = text[text.index(titles[1]):text.index(titles[2])]
    assert ("  fraction 0.05: geometric matching beats similarity matching: holds "
            "(geometric - similarity = +0.100, beyond the seed spread of 0.010)") in dense
    assert "  fraction 0.5: not run" in dense and "  fraction 1: not run" in dense


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
