"""The study's report: mean ± std tables per fraction and matching, a cautious verdict per
fraction (paired by seed), the paper's two claims, the new arms against the paper's three,
and the matching diagnostics (the picture: :mod:`glsd.tools.study_plot`).

It reads the per-cell records of :mod:`glsd.tools.study` and nothing else, so
``glsd study ... --report-only`` rewrites it from finished cells.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

from glsd.config import MATCHINGS

BASELINE_ARMS = ("none", "similarity", "geometric")  # the paper's arms
NEW_ARMS = tuple(m for m in MATCHINGS if m not in BASELINE_ARMS)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_cell(entry: dict, digits: int) -> str:
    """One table cell: "mean ± std (n=k)", or "mean (1 seed)" where there is no spread yet."""
    if entry["n"] == 1:
        return f"{entry['mean']:.{digits}f} (1 seed)"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f} (n={entry['n']})"


def floor_of(records: list[dict], key: str, fraction: float) -> float:
    """The random-init floor of ``key`` at ``fraction``: the mean over its seeds' floors
    (every arm of a seed shares one)."""
    per_seed = {r["seed"]: r[key] for r in records if r.get("status") == "done"
                and r["fraction"] == fraction and r.get(key) is not None}
    return mean_std(list(per_seed.values()))[0]


def summarize(records: list[dict], key: str = "knn_top1") -> dict:
    """{fraction: {matching: {"mean", "std", "n", "per_seed": {seed: value}}}}."""
    table: dict = {}
    for r in records:
        if r.get("status") != "done" or r.get(key) is None:  # not evaluated in that cell
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
    the two arms' sample standard deviations over those same seeds (a seed one arm ran alone
    is in neither the margin nor the spread), with every seed agreeing on the sign."""
    seeds = sorted(set(row[a]["per_seed"]) & set(row[b]["per_seed"]))
    diffs = [row[a]["per_seed"][s] - row[b]["per_seed"][s] for s in seeds]
    if not diffs:
        return None
    margin = statistics.fmean(diffs)
    spread = max(mean_std([row[arm]["per_seed"][s] for s in seeds])[1] for arm in (a, b))
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    clear = abs(margin) > spread and same_sign and len(diffs) > 1
    return {"margin": margin, "spread": spread, "clear": clear, "diffs": diffs}


def verdict(row: dict, digits: int = 2) -> str:
    """Which matching leads at one fraction, by how much, and whether it beats the spread.
    The rule is deliberately cautious: each arm's spread also holds the subset-to-subset
    variation that pairing by seed removes."""
    ranked = sorted(row, key=lambda m: -ranking_mean(row, m))
    best = ranked[0]
    if len(ranked) < 2:
        return f"only {best} has finished cells: no comparison yet"
    top = ranking_mean(row, best)
    tied = [m for m in ranked if round(top - ranking_mean(row, m), digits) == 0]  # as printed
    parts = [f"**{best}** leads" if len(tied) == 1
             else " and ".join(f"**{m}**" for m in tied) + f" tie at {top:.{digits}f}"]
    for other in ranked[len(tied):]:
        p = paired_margin(row, best, other)
        if p is None:
            continue
        f = f"{{:+.{digits}f}}"
        detail = evidence(p, digits)
        if len(p["diffs"]) > 1:
            detail += f"; per-seed differences {', '.join(f.format(d) for d in p['diffs'])}"
        parts.append(f"{f.format(p['margin'])} over {other} ({detail})")
    return "; ".join(parts)


def evidence(p: dict, digits: int) -> str:
    """How far a paired margin can be trusted: one seed, beyond the spread, within it, or
    larger than it with the seeds disagreeing in sign."""
    if len(p["diffs"]) == 1:
        return "one seed: no spread to compare with"
    if p["clear"]:
        return f"beyond the seed spread of {p['spread']:.{digits}f}"
    if abs(p["margin"]) > p["spread"]:  # large, but not every seed says so
        return f"larger than the seed spread of {p['spread']:.{digits}f}, but the seeds disagree in sign"
    return f"within the seed spread of {p['spread']:.{digits}f}"


PAPER_CLAIMS = (("geometric", "similarity", "geometric matching beats similarity matching"),
                ("none", "similarity", "similarity matching is worse than global-only"))


def ranking_mean(row: dict, arm: str) -> float:
    """The arm's mean over the seeds every arm of the row finished (all its seeds when they
    share none): a seed run for some arms only must not decide a ranking by itself."""
    shared = set.intersection(*(set(c["per_seed"]) for c in row.values()))
    values = row[arm]["per_seed"]
    return statistics.fmean(values[s] for s in shared) if shared else row[arm]["mean"]


def best_new_and_old(row: dict) -> Optional[tuple[str, str]]:
    """(best new arm, best of the paper's arms) at one fraction (:func:`ranking_mean`), or
    None when either side has no finished cell."""
    new = [m for m in NEW_ARMS if m in row]
    old = [m for m in BASELINE_ARMS if m in row]
    if not new or not old:
        return None
    return (max(new, key=lambda m: ranking_mean(row, m)), max(old, key=lambda m: ranking_mean(row, m)))


def questions(row: dict) -> list[tuple[str, str, str, Optional[dict]]]:
    """The comparisons the study exists to answer at one fraction, as (a, b, claim, paired
    margin a - b or None when no seed finished both): the paper's two claims, then, when
    new arms ran, the best of them against the best of the paper's arms."""
    out = []
    for a, b, claim in PAPER_CLAIMS:
        out.append((a, b, claim, paired_margin(row, a, b) if a in row and b in row else None))
    pair = best_new_and_old(row)
    if pair:
        out.append((*pair, f"best new arm beats the best of {'/'.join(BASELINE_ARMS)}",
                    paired_margin(row, *pair)))
    return out


def outcome(p: dict, digits: int) -> str:
    """"holds", "a tie" (the margin rounds to zero at the report's digits) or "does not hold"."""
    margin = round(p["margin"], digits)
    return "holds" if margin > 0 else "a tie" if margin == 0 else "does not hold"


def paper_claims(row: dict, digits: int = 2, not_run: bool = False) -> list[str]:
    """The paper's two low-data claims, each checked at one fraction (paired by seed).
    A claim whose arms have no finished cell in common is left out, or with ``not_run``
    stated as not run."""
    out = []
    for a, b, claim, p in questions(row)[:len(PAPER_CLAIMS)]:
        if p is None:
            if not_run:
                missing = [m for m in (a, b) if m not in row]
                why = (f"no finished {' or '.join(missing)} cell" if missing
                       else f"no seed finished in both {a} and {b}")
                out.append(f"{claim}: not run ({why})")
            continue
        out.append(f"{claim}: {outcome(p, digits)} "
                   f"({a} - {b} = {p['margin']:+.{digits}f}, {evidence(p, digits)})")
    return out


def new_arm_verdict(row: dict, digits: int = 2) -> Optional[str]:
    """The best new arm against the best baseline arm at one fraction (paired by seed), or
    None when either side has no finished cell."""
    extra = questions(row)[len(PAPER_CLAIMS):]
    if not extra or extra[0][3] is None:
        return None
    best_new, best_old, _, p = extra[0]
    return (f"best new arm ({best_new}) vs the best of {'/'.join(BASELINE_ARMS)} ({best_old}): "
            f"{p['margin']:+.{digits}f} ({evidence(p, digits)})")


def unsettled(row: dict) -> list[tuple[str, str]]:
    """The :func:`questions` whose paired margin at one fraction is not yet beyond the seed
    spread although two or more seeds ran: the arm pairs a further seed should be run for.
    Comparisons with one seed are not listed: they need seed 2 anyway."""
    out = []
    for a, b, _, p in questions(row):
        if p is not None and len(p["diffs"]) > 1 and not p["clear"] and (a, b) not in out:
            out.append((a, b))
    return out


def extra_seed_arms(records: list[dict], key: str = "knn_top1") -> dict:
    """{fraction: [matching, ...]}: the arms of each fraction that take part in an unsettled
    comparison (:func:`unsettled`), in the study's matching order."""
    plan = {}
    for frac, row in sorted(summarize(records, key).items()):
        arms = {m for pair in unsettled(row) for m in pair}
        if arms:
            plan[frac] = [m for m in MATCHINGS if m in arms]
    return plan


def verdict_lines(frac: float, row: dict, text: str, digits: int = 2) -> list[str]:
    """A fraction's verdict bullet, then the new-arm line when new arms ran."""
    lines = [f"- fraction {frac:g}: {text}"]
    new = new_arm_verdict(row, digits)
    if new:
        lines.append(f"- fraction {frac:g}, new arms: {new}.")
    return lines


# The record key of each evaluation's random-init floor, where the study computes one.
FLOOR_KEYS = {"knn_top1": "knn_floor_top1", "dense_within_one": "dense_floor_within_one",
              "seg_accuracy": "seg_floor_accuracy", "seg_miou": "seg_floor_miou"}
OTHER_EVALUATIONS = {
    "linear_top1": ("Linear probe top-1 (%)", 2),
    "dense_within_one": ("Dense correspondence: fraction of cells matched within one cell "
                         "(label-free, held-out test images; `glsd eval dense`)", 3),
    "seg_accuracy": ("Labelled dense probe: cell accuracy of a linear probe of local features "
                     "on mosaics of test images (`glsd eval seg`)", 3),
    "seg_miou": ("Labelled dense probe: mIoU over the mosaic cells (`glsd eval seg`)", 3),
}


def other_evaluations(records: list[dict], matchings: list[str]) -> list[str]:
    """A table and a verdict per fraction for each evaluation besides k-NN that was run."""
    lines: list[str] = []
    for key, (title, digits) in OTHER_EVALUATIONS.items():
        done = [r for r in records if r.get("status") == "done" and r.get(key) is not None]
        if not done:
            continue
        table = summarize(done, key)
        floor_key = FLOOR_KEYS.get(key)
        with_floor = floor_key is not None and any(r.get(floor_key) is not None for r in done)
        lines += ["", f"## {title}", "", "| fraction | " + ("floor | " if with_floor else "")
                  + " | ".join(matchings) + " |", "|---|" + "---|" * (len(matchings) + with_floor)]
        for frac in sorted(table):
            row = table[frac]
            cells = [mean_cell(row[m], digits) if m in row else "-" for m in matchings]
            if with_floor:
                cells.insert(0, f"{floor_of(done, floor_key, frac):.{digits}f}")
            lines.append(f"| {frac:g} | " + " | ".join(cells) + " |")
        lines.append("")
        for frac in sorted(table):
            claims = "; ".join(paper_claims(table[frac], digits))
            below = (below_floor(table[frac], floor_of(done, floor_key, frac), digits)
                     if with_floor else "")
            lines += verdict_lines(frac, table[frac], f"{verdict(table[frac], digits)}.{below}"
                                   + (f" Paper: {claims}." if claims else ""), digits)
    return lines


def below_floor(row: dict, floor: float, digits: int) -> str:
    """" Below the random-init floor (...): arms." for arms that end under it, else ""."""
    under = [m for m in row if row[m]["mean"] < floor]
    if not under:
        return ""
    return (f" **Below the random-init floor** ({floor:.{digits}f}): {', '.join(under)}; the "
            "training made these features worse than untrained ones for this evaluation.")


def settings(records: list[dict], key: str) -> str:
    """A per-cell setting (k, temperature, data) as one string: the common value, all values
    joined when cells differ, "" for records written before it was recorded."""
    values = sorted({str(r[key]) for r in records if r.get("status") == "done" and key in r})
    return " / ".join(values)


def _stated(records: list[dict]) -> tuple[str, str]:
    """("Data: ... . ", "k=.., T=.., ") as the cells recorded them (empty when they did not)."""
    data, k, temp = (settings(records, key) for key in ("data", "knn_k", "knn_temperature"))
    fewer = sorted({(r["fraction"], r["knn_k_effective"]) for r in records if r.get("status") == "done"
                    and r.get("knn_k_effective") is not None and r["knn_k_effective"] != r.get("knn_k")})
    if k and fewer:  # a bank smaller than k: all of it votes
        k += " (" + ", ".join(f"{e} at fraction {f:g}" for f, e in fewer) + ": fewer training images)"
    return (f"Data: {data}. " if data else ""), (f"k={k}, T={temp}, " if k and temp else "")


def _unsettled_section(table: dict) -> list[str]:
    """The k-NN comparisons still within the seed spread, and the arms a further seed needs."""
    rows = {frac: unsettled(row) for frac, row in sorted(table.items())}
    rows = {frac: pairs for frac, pairs in rows.items() if pairs}
    if not rows:
        return []
    lines = ["", "## The study's questions still within the seed spread (k-NN)", "",
             "Margins that two or more seeds do not yet settle; a further seed of these arms "
             "would (`extra_seed_arms`).", ""]
    for frac, pairs in rows.items():
        lines.append(f"- fraction {frac:g}: " + "; ".join(f"{a} vs {b}" for a, b in pairs))
    return lines


def report_markdown(records: list[dict]) -> str:
    table = summarize(records)
    done = [r for r in records if r.get("status") == "done"]
    matchings = [m for m in MATCHINGS if any(r["matching"] == m for r in done)]
    lines = ["# Low-data study: which matching, by data fraction", ""]
    lines += _knn_section(records, table, matchings) if table else [
        "k-NN was not among the evaluations of these cells (`--evals`): no k-NN table or verdict."]
    lines += other_evaluations(records, matchings)
    lines += _unsettled_section(table)
    lines += _diagnostics_section(done, matchings)
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed cells", ""] + [f"- {r['name']}: {r['error']}" for r in failed]
    missing = [r["name"] for r in records if r.get("status") == "not run"]
    if missing:
        lines += ["", "## Cells not run yet", "", ", ".join(missing)]
    return "\n".join(lines) + "\n"


def _knn_section(records: list[dict], table: dict, matchings: list[str]) -> list[str]:
    """The k-NN table (mean ± std per arm, the floor), steps per cell, and the verdicts."""
    data, knn = _stated(records)
    lines = ["## k-NN top-1 (%)", "",
             f"{data}Mean ± std over seeds ({knn}{_evaluated(records)}). Floor: the same backbone "
             "at random init.", "",
             "| fraction | images | floor | " + " | ".join(matchings) + " |",
             "|---|---|---|" + "---|" * len(matchings)]
    n_images = {r["fraction"]: r["n_images"] for r in records if r.get("status") == "done"}
    for frac in sorted(table):
        row = table[frac]
        floor = floor_of(records, "knn_floor_top1", frac)
        cells = [mean_cell(row[m], 2) if m in row else "-" for m in matchings]
        lines.append(f"| {frac:g} | {n_images.get(frac, '?')} | {floor:.2f} | " + " | ".join(cells) + " |")
    steps = {r["fraction"]: r["steps"] for r in records if r.get("status") == "done" and "steps" in r}
    if steps:  # whole epochs: study.steps rounded to a multiple of each subset's epoch
        lines += ["", "Optimisation steps per cell: " + "; ".join(
            f"{f:g}: {steps[f]:,}" for f in sorted(steps)) + "."]
    lines += ["", "## Verdict per fraction", "",
              "A comparison only means something when every arm learns: the bar is the "
              "global-only (none) arm at least 10 points above the floor.", ""]
    for frac in sorted(table):
        claims = "; ".join(paper_claims(table[frac]))
        lines += verdict_lines(frac, table[frac], f"{verdict(table[frac])}. {_bar(records, table[frac], frac)}"
                               + (f" Paper: {claims}." if claims else ""))
    return lines


def _bar(records: list[dict], row: dict, frac: float) -> str:
    """The global-only arm's lift over the floor, on the seeds it ran."""
    if "none" not in row:
        return "No global-only (none) arm: the bar was not measured."
    seeds = set(row["none"]["per_seed"])
    floor = floor_of([r for r in records if r.get("seed") in seeds], "knn_floor_top1", frac)
    lift = row["none"]["mean"] - floor
    bar = "met" if lift >= 10 else "NOT met: read the comparison with care"
    return f"Global-only arm vs floor: {lift:+.2f} points ({bar})."


def _evaluated(records: list[dict]) -> str:
    """What the k-NN evaluated, as the cells recorded it (the defaults, said as such, for
    cells recorded before these keys existed)."""
    model, fraction, cap = (settings(records, key) for key in ("eval_model", "eval_train_fraction",
                                                                  "max_test_images"))
    if not model:
        return ("teacher backbone, labelled train images = the pretraining subset, full test "
                "split: the defaults; these cells did not record their evaluation settings")
    train = ("the pretraining subset" if fraction in ("", "None")
             else f"eval.train_fraction={fraction} of the pretraining subset")
    test = "full test split" if cap in ("", "None") else f"at most {cap} test images"
    return f"{model} backbone, labelled train images = {train}, {test}"


def _diagnostics_section(done: list[dict], matchings: list[str]) -> list[str]:
    lines = ["", "## Matching diagnostics at the end of training", "",
             "How often the similarity match equals the geometric match (among cells with a valid "
             "geometric match), and the mean distance of similarity matches from the true "
             "location, in teacher cells; computed in every arm.", "",
             "| fraction | matching | sim = geo | sim distance (cells) | valid geometric matches |",
             "|---|---|---|---|---|"]
    for frac in sorted({r["fraction"] for r in done}):
        for m in matchings:
            rs = [r for r in done if r["fraction"] == frac and r["matching"] == m]
            if rs:
                agree = mean_std([r["final"].get("sim_geo_agree") for r in rs])[0]
                dist = mean_std([r["final"].get("sim_dist_cells") for r in rs])[0]
                valid = mean_std([r["final"].get("geo_valid_frac") for r in rs])[0]
                lines.append(f"| {frac:g} | {m} | {agree:.3f} | {dist:.2f} | {valid:.3f} |")
    return lines
