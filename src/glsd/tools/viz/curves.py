"""Training curves of several runs overlaid, from their metrics.jsonl and config.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from glsd.tools.viz.common import DPI, PathLike, VizError, figure, save
from glsd.train.run_folder import read_metrics_records

PLOT_FIGSIZE = (16.0, 7.0)  # inches; times dpi gives the PNG size
PLOT_METRICS = ("loss", "loss_global", "loss_local", "knn_top1",
                "geo_valid_frac", "sim_geo_agree", "sim_dist_cells")


def run_folder(path: PathLike) -> Path:
    """The run folder, also when it is named by its log (``RUN/metrics.jsonl``)."""
    path = Path(path)
    return path.parent if path.name == "metrics.jsonl" and not path.is_dir() else path


def read_run(run_dir: PathLike) -> tuple[list[dict], dict]:
    """(metrics records, config dict) of a run folder; a torn last line (a run still
    writing) is skipped."""
    run_dir = run_folder(run_dir)
    metrics, cfg_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not run_dir.exists():
        raise VizError(f"{run_dir} does not exist: give a run folder (the output_dir of a glsd pretrain)")
    if not metrics.is_file():
        raise VizError(f"{run_dir} has no metrics.jsonl: is it a glsd run folder that has logged a step?")
    records = read_metrics_records(metrics)
    raw = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return records, raw if isinstance(raw, dict) else {}


def run_label(run_dir: PathLike, raw: dict) -> str:
    """``name: matching, data amount`` from a run's config.yaml (what the curves compare)."""
    data, loss = raw.get("data", {}), raw.get("loss", {})
    if data.get("num_images"):
        amount = f"{data['num_images']} images"
    else:
        amount = f"{100 * float(data.get('fraction', 1.0)):g}% of data"
    return f"{run_folder(run_dir).resolve().name}: {loss.get('matching', '?')}, {amount}"


X_AXES = ("step", "epoch")


def _curve(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, values) of the records that hold ``key`` (online k-NN records are separate)."""
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# Line style by matching, colour by run: runs that differ only in matching stay apart.
LINESTYLES = {"none": ":", "similarity": "--", "geometric": "-", "soft_geometric": "-.",
              "hybrid": (0, (5, 1))}


def plot_runs(run_dirs: Sequence[PathLike], out: PathLike, dpi: int = DPI, x: str = "step") -> Path:
    """Write the curves (``PLOT_FIGSIZE * dpi`` pixels) of PLOT_METRICS against ``x`` (the
    step, or the epoch: runs of other batch sizes, or one resumed under another world size,
    whose steps count batches of another size), one colour per run, the legend in the last panel."""
    if not run_dirs:
        raise VizError("give at least one run folder")
    if x not in X_AXES:
        raise VizError(f"x={x!r}: plot against one of {', '.join(X_AXES)}")
    runs, named = [], {}
    for d in run_dirs:  # a run named twice (run, run/metrics.jsonl, ./run) is drawn once
        named.setdefault(run_folder(d).resolve(), d)
    for d in named.values():  # as the user wrote it, for the messages
        records, raw = read_run(d)
        runs.append((run_label(d, raw), records, raw.get("loss", {}).get("matching")))
    fig = figure(PLOT_FIGSIZE, dpi)
    from matplotlib.lines import Line2D  # after _figure: it has checked that matplotlib exists

    axes = fig.subplots(2, 4).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, PLOT_METRICS):
        drawn = 0
        for (label, records, matching), color in zip(runs, colors):
            steps, values = _curve(records, key, x)
            if steps:
                ax.plot(steps, values, color=color, ls=LINESTYLES.get(matching, "-"),
                        marker="o" if len(steps) < 20 else None, ms=3, lw=1.3, label=label)
                drawn += 1
        if not drawn:  # say why the panel is empty instead of leaving a bare frame
            hint = " (eval.every_epochs=0)" if key == "knn_top1" else ""
            ax.text(0.5, 0.5, f"not logged{hint}", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    legend_ax = axes[len(PLOT_METRICS)]
    legend_ax.set_axis_off()
    handles = [Line2D([], [], color=c, ls=LINESTYLES.get(m, "-"), lw=2) for (_, _, m), c in zip(runs, colors)]
    legend_ax.legend(handles, [run[0] for run in runs], loc="center", fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.94, bottom=0.08, wspace=0.28, hspace=0.38)
    return save(fig, out)
