#!/usr/bin/env python
"""What the local loss costs: alone, and in the real training step, against the same loss of an
earlier commit, interleaved in one process.

**loss**: the local loss alone (teacher probabilities, targets, cross-entropy, forward +
backward), this tree's against ``--rev``'s, interleaved call by call.

A preset's shapes (views, batch, grid cells, local prototypes) and bf16 logits in the range a
DINO head gives (cosines of L2-normalised bottleneck features and unit prototypes: |x| < 1;
far larger values would time exp's slow underflow path instead); geometric-like hard matches
with 20% invalid cells, or soft 4-cell matches. Prints one JSON object (``--out`` writes it too) with the median milliseconds per
call, the per-round paired ratio (old / new, > 1: the new one is faster) and its quartiles,
and the largest difference of value and gradient between the two.

**compile**: the lever of fused kernels. The loss alone, this tree's eager against this tree's
and ``--rev``'s under ``torch.compile``, with each compile's seconds (cold only with an empty
``TORCHINDUCTOR_CACHE_DIR``).

    python benchmarks/local_loss_cost.py --rev HEAD~1 --preset cifar10-lowdata-cpu --parts loss
"""
from __future__ import annotations

import argparse
import math
import importlib.util
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glsd.config import load_config  # noqa: E402
from glsd.loss.dino import DINOLocalLoss, view_pairs  # noqa: E402
from glsd.loss.matching import Matches  # noqa: E402
from glsd.tools.bench.common import cpu_model, finite, write_json  # noqa: E402
from glsd.train.preflight import check_grids  # noqa: E402


def module_at(rev: str, path: str, name: str):
    """``path`` of the repository as it was at ``rev``, imported under ``name``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(preset: str, soft: bool, seed: int = 0):
    cfg = load_config(preset, ["data.source=synthetic"])
    c, m = cfg.crops, cfg.model
    grids = check_grids(cfg)[0]
    nt, nl = (math.prod(grids[f"{kind} {size} px"]) for kind, size in
              (("global", c.global_size), ("local", c.local_size)))
    vt, vl, b, k = c.num_global, c.num_local, cfg.train.batch_size, m.local_out_dim or m.out_dim
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(k, m.local_bottleneck_dim or m.bottleneck_dim, generator=g), dim=-1)

    def head_logits(*shape):
        features = torch.randn(*shape, prototypes.shape[1], generator=g)
        return (F.normalize(features, dim=-1) @ prototypes.T).bfloat16()

    teacher = head_logits(vt, b, nt)
    groups = [head_logits(vt, b, nt), head_logits(vl, b, nl)]
    pairs = [view_pairs(vt, 0, vt), view_pairs(vt, vt, vl)]
    matches = []
    for (t_idx, _), ns in zip(pairs, (nt, nl)):
        shape = (len(t_idx), b, ns)
        valid = torch.rand(*shape, generator=g) > 0.2
        if soft:
            index = torch.randint(0, nt, (*shape, 4), generator=g)
            weight = torch.softmax(torch.randn(*shape, 4, generator=g), -1)
            matches.append(Matches(index, valid, weight))
        else:
            matches.append(Matches(torch.randint(0, nt, shape, generator=g), valid))
    return dict(teacher=teacher, groups=groups, pairs=pairs, matches=matches, k=k,
                shapes={"teacher": list(teacher.shape), "student": [list(x.shape) for x in groups]})


def call(loss_fn, data, temp=0.04):
    groups = [x.clone().requires_grad_() for x in data["groups"]]
    loss = loss_fn(groups, data["teacher"], data["pairs"], data["matches"], temp)
    loss.backward()
    return loss.detach(), [x.grad for x in groups]


def quartiles(xs: list[float]) -> dict:
    """Median and quartiles, interpolated between samples (``statistics.quantiles``)."""
    if len(xs) < 2:
        return {"median": xs[0], "q25": xs[0], "q75": xs[0]}
    q25, q50, q75 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": q50, "q25": q25, "q75": q75}


def bench_loss(old_mod, preset: str, soft: bool, rounds: int) -> dict:
    data = inputs(preset, soft)
    forms = {"old": old_mod.DINOLocalLoss(data["k"]), "new": DINOLocalLoss(data["k"])}
    (v_old, g_old), (v_new, g_new) = (call(fn, data) for fn in forms.values())
    times = {name: [] for name in forms}
    for r in range(rounds + 2):  # two warm-up rounds
        for name in (list(forms) if r % 2 else list(forms)[::-1]):
            t = time.perf_counter()
            call(forms[name], data)
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    return {
        "soft": soft, "shapes": data["shapes"],
        "ms_median": {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()},
        "ratio_old_over_new": quartiles([o / n for o, n in zip(times["old"], times["new"])]),
        "max_abs_diff": {"loss": float((v_old - v_new).abs()),
                         "grad": max(float((a.float() - b.float()).abs().max()) for a, b in zip(g_old, g_new))},
    }


def bench_compile(old_mod, preset: str, rounds: int) -> dict:
    """The lever of fused kernels: this tree's loss eager, and this tree's and ``--rev``'s
    under ``torch.compile`` (static shapes), interleaved; with the seconds each compile took."""
    data = inputs(preset, soft=False)
    forms = {"eager": DINOLocalLoss(data["k"]),
             "compiled": torch.compile(DINOLocalLoss(data["k"]), dynamic=False),
             "compiled_rev": torch.compile(old_mod.DINOLocalLoss(data["k"]), dynamic=False)}
    compile_s, results = {}, {}
    for name, fn in forms.items():
        t = time.perf_counter()
        results[name] = call(fn, data)
        compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in forms}
    for r in range(rounds + 2):  # two warm-up rounds
        order = list(forms)[r % len(forms):] + list(forms)[:r % len(forms)]
        for name in order:
            t = time.perf_counter()
            call(forms[name], data)
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    v_ref, g_ref = results["eager"]
    return {
        "shapes": data["shapes"], "first_call_s": compile_s,
        "ms_median": {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()},
        "eager_over": {n: quartiles([e / c for e, c in zip(times["eager"], times[n])])
                       for n in forms if n != "eager"},
        "max_abs_diff_to_eager": {n: {"loss": float((v - v_ref).abs()), "grad": max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(g, g_ref))}
            for n, (v, g) in results.items() if n != "eager"},
    }


def bench_step(old_mod, preset: str, rounds: int) -> dict:
    from glsd.config import apply_overrides
    from glsd.tools.bench.harness import build_harness, first_batch

    cfg = load_config(preset, ["data.source=synthetic", "device=cpu"])
    batch = first_batch(cfg)
    cpu = torch.device("cpu")
    arms = {m: build_harness(m, apply_overrides(cfg, [f"loss.matching={m}"]), cpu, batch)
            for m in ("none", "geometric")}
    old = build_harness("geometric_old_loss", apply_overrides(cfg, ["loss.matching=geometric"]), cpu, batch)
    new_loss = old.ctx.objective.local_loss
    swapped = old_mod.DINOLocalLoss(new_loss.center.center.shape[1], new_loss.student_temp,
                                    new_loss.center.momentum, new_loss.normalize)
    old.ctx.objective.local_loss = swapped
    arms["geometric_old_loss"] = old
    names = list(arms)
    for r in range(rounds + 2):  # two warm-up rounds
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            arms[name].step(timed=r >= 2)
    step_ms = {n: [1e3 * s for s in h.step_seconds] for n, h in arms.items()}
    return {
        "batch_size": cfg.train.batch_size, "backbone": cfg.model.backbone,
        "local_head": [cfg.model.local_hidden_dim or cfg.model.hidden_dim,
                       cfg.model.local_out_dim or cfg.model.out_dim],
        "step_ms_median": {n: sorted(v)[len(v) // 2] for n, v in step_ms.items()},
        "images_per_s": {n: cfg.train.batch_size / (sorted(v)[len(v) // 2] / 1e3) for n, v in step_ms.items()},
        "geometric_over_none": quartiles([g / n for g, n in zip(step_ms["geometric"], step_ms["none"])]),
        "geometric_old_loss_over_none": quartiles(
            [g / n for g, n in zip(step_ms["geometric_old_loss"], step_ms["none"])]),
        "geometric_old_loss_over_geometric": quartiles(
            [o / g for o, g in zip(step_ms["geometric_old_loss"], step_ms["geometric"])]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1", help="the earlier commit to compare with")
    ap.add_argument("--preset", default="cifar10-lowdata-cpu")
    ap.add_argument("--soft", action="store_true", help="soft 4-cell matches (soft_geometric)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds of the loss part")
    ap.add_argument("--step-rounds", type=int, default=15, help="rounds of the step part")
    ap.add_argument("--parts", default="loss,step", help="any of loss, step, compile")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    old_mod = module_at(args.rev, "src/glsd/loss/dino.py", "dino_at_rev")
    out = {
        "command": " ".join(["python", "benchmarks/local_loss_cost.py", *(argv or sys.argv[1:])]),
        "rev": subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip(),
        "preset": args.preset, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "cpu": cpu_model(),
    }
    if "loss" in args.parts:
        out["loss"] = bench_loss(old_mod, args.preset, args.soft, args.rounds)
    if "compile" in args.parts:
        out["compile"] = bench_compile(old_mod, args.preset, args.rounds)
    if "step" in args.parts:
        out["step"] = bench_step(old_mod, args.preset, args.step_rounds)
    print(write_json(finite(out), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
