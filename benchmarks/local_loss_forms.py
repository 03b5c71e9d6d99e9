#!/usr/bin/env python
"""The local loss alone (teacher probabilities, targets, cross-entropy, forward + backward)
against the same loss of an earlier commit, interleaved call by call in one process.

A preset's shapes (views, batch, grid cells, local prototypes) and bf16 student logits, as the
training step feeds them; geometric-like hard matches with 20% invalid cells, or soft 4-cell
matches. Prints one JSON object (``--out`` writes it too) with the median milliseconds per
call, the per-round paired ratio (old / new, > 1: the new one is faster) and its quartiles,
and the largest difference of value and gradient between the two.

    python benchmarks/local_loss_forms.py --rev HEAD~1 --preset cifar10-lowdata-cpu
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from glsd.config import load_config  # noqa: E402
from glsd.loss.dino import DINOLocalLoss, view_pairs  # noqa: E402
from glsd.loss.matching import Matches  # noqa: E402


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
    stride = 4 if m.backbone == "glsd_convnet" else (m.patch_size or 16)
    nt, nl = (c.global_size // stride) ** 2, (c.local_size // stride) ** 2
    vt, vl, b, k = c.num_global, c.num_local, cfg.train.batch_size, m.local_out_dim or m.out_dim
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(vt, b, nt, k, generator=g).bfloat16()
    groups = [torch.randn(vt, b, nt, k, generator=g).bfloat16(),
              torch.randn(vl, b, nl, k, generator=g).bfloat16()]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1", help="the earlier commit to compare with")
    ap.add_argument("--preset", default="cifar10-lowdata-cpu")
    ap.add_argument("--soft", action="store_true", help="soft 4-cell matches (soft_geometric)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    old_mod = module_at(args.rev, "src/glsd/loss/dino.py", "dino_at_rev")
    data = inputs(args.preset, args.soft)
    forms = {"old": old_mod.DINOLocalLoss(data["k"]), "new": DINOLocalLoss(data["k"])}
    results = {name: call(fn, data) for name, fn in forms.items()}
    (v_old, g_old), (v_new, g_new) = results["old"], results["new"]
    times = {name: [] for name in forms}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name in (list(forms) if r % 2 else list(forms)[::-1]):
            t = time.perf_counter()
            call(forms[name], data)
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    paired = sorted(o / n for o, n in zip(times["old"], times["new"]))
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    out = {
        "command": " ".join(["python", "benchmarks/local_loss_forms.py", *(argv or sys.argv[1:])]),
        "rev": subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip(),
        "preset": args.preset, "soft": args.soft, "shapes": data["shapes"],
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "ms_median": {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()},
        "ratio_old_over_new": {"median": q(paired, 0.5), "q25": q(paired, 0.25), "q75": q(paired, 0.75)},
        "max_abs_diff": {"loss": float((v_old - v_new).abs()),
                         "grad": max(float((a.float() - b.float()).abs().max()) for a, b in zip(g_old, g_new))},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
