#!/usr/bin/env python
"""The GPU limit of the paper step, in one bounded run (~8 minutes on an H100 / H200).

(a) ``step``: glsd's real training step (``imagenet-swin-t``: Swin-T/7, 2 x 224 + 8 x 96 crops,
    65536 prototypes, bf16, batched device augmentation from uint8 images on the GPU) per
    matching at batch 64 / 128 / 256, interleaved; the host syncs of one step counted by
    ``torch.profiler`` (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
    ``cudaEventSynchronize``, synchronous ``cudaMemcpy``); FLOPs of one step
    (``torch.utils.flop_counter.FlopCounterMode``) and the achieved FLOP/s.
(b) ``timm``: timm's own supervised training step of the same backbone (same kwargs and
    drop path, 1000 classes, cross-entropy on random labels, 224 px, same autocast dtype,
    AdamW foreach, same gradient clipping) at the same batches: the backbone-part limit.
    ``flops_ratio_glsd_over_timm`` is glsd's achieved FLOP/s over timm's (goal >= 0.8 for the
    global-only arm).
(c) ``compile``: ``torch.compile`` of both backbones (static shapes: one graph per
    resolution), each mode in a child process killed after ``--compile-timeout`` seconds:
    compile time (first steps) and speed-up over eager, timed interleaved in that child.

Every part has a time guard (``--budget-*``): what does not fit is recorded as skipped, and
the JSON is rewritten after each part, so a killed run still leaves what it measured.
``--dry-run`` runs every code path on the CPU with a tiny Swin, batch 2, one step each and
``torch.compile(backend="eager")`` (the tests run it).

    python benchmarks/gpu_limit.py --out benchmarks/results/gpu-limit-<gpu>.json
    python benchmarks/gpu_limit.py --dry-run --out /tmp/gpu-limit-dry.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from glsd.config import load_config  # noqa: E402
from glsd.data.multicrop import decode_size  # noqa: E402
from glsd.tools.bench import environment, write_json  # noqa: E402
from glsd.tools.bench.common import finite, log, median, ratio  # noqa: E402
from glsd.tools.bench.device import PAPER_PRESET, PAPER_STEP, device_batch  # noqa: E402

SCHEMA = "glsd-gpu-limit/1"
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# --dry-run: a Swin of one block per stage, window 2, on 64 / 32 px crops (seconds on a CPU).
DRY = ["crops.global_size=64", "crops.local_size=32", "crops.num_local=2", "crops.decode_size=null",
       "model.backbone_kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], window_size: 2}",
       "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16"]


class Clock:
    """The run's time guards: each part may start work only while its budget lasts."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def since(self, t: float) -> float:
        return time.perf_counter() - t


def paper_config(args, batch: int, matching: str):
    return load_config(PAPER_PRESET, [*PAPER_STEP, f"train.batch_size={batch}", f"loss.matching={matching}",
                                      f"device={args.device.type}", *(DRY if args.dry_run else []),
                                      *args.overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn, device: torch.device) -> dict:
    """Host-sync events of the CUDA runtime during one call of ``fn`` (none on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
    # The profiler synchronises the device on leaving its context and may record that call:
    # an empty profile's count is subtracted, so only the step's own syncs remain.
    with profile(activities=activities) as empty:
        pass
    counts = sync_counts(ev.name for ev in prof.events())
    own = sync_counts(ev.name for ev in empty.events())["events"]
    events = {k: n - own.get(k, 0) for k, n in counts["events"].items() if n - own.get(k, 0) > 0}
    # the raw counts stay: if the empty profile recorded a sync the step's did not, it shows
    below = sorted(k for k, n in own.items() if counts["events"].get(k, 0) < n)
    return {"events": events, "host_syncs": sum(events.values()), "profiler_own": own,
            "raw_events": counts["events"], "own_not_in_step": below}


def sync_counts(names) -> dict:
    """Counts of the CUDA runtime calls that block the host, by name: the synchronize calls
    and the synchronous ``cudaMemcpy`` family (``cudaMemcpyAsync`` does not block by itself;
    the ``.item()`` after one shows up as ``cudaStreamSynchronize``)."""
    counts: dict[str, int] = {}
    for name in names:
        if name.startswith(SYNC_EVENTS) and "Async" not in name:
            counts[name] = counts.get(name, 0) + 1
    return {"events": counts, "host_syncs": sum(counts.values())}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def part_step(args, clock: Clock) -> dict:
    """(a): per batch, the matchings interleaved; syncs and FLOPs of one step each."""
    from glsd.tools.bench.harness import build_harness

    start, out = time.perf_counter(), {"budget_s": args.budget_step, "batches": {}}
    for b in args.batches:
        if clock.since(start) > args.budget_step:
            out["batches"][str(b)] = {"skipped": "time guard"}
            continue
        rows, harnesses = {}, []
        for mode in args.modes:
            try:
                cfg = paper_config(args, b, mode)
                h = build_harness(mode, cfg, args.device, device_batch(cfg, args.device), steps_per_epoch=1000)
                for _ in range(args.warmup):
                    h.step(timed=False)
                h.match_inputs = None  # the first step's outputs: not needed here, GiBs at batch 256
                harnesses.append(h)
            except Exception as e:  # noqa: BLE001 - record an OOM, keep the others
                if not is_oom(e):
                    raise
                rows[mode] = {"error": f"out of memory: {e}"[:300]}
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            for r in range(args.steps):
                if clock.since(start) > args.budget_step and r >= 1:
                    break
                for k in range(len(harnesses)):
                    harnesses[(r + k) % len(harnesses)].step()
            for h in harnesses:
                rows[h.name] = summarise(h, args.device)
        except Exception as e:  # noqa: BLE001 - an OOM of the interleaved steps ends this batch
            if not is_oom(e):
                raise
            rows["error"] = f"out of memory with {[h.name for h in harnesses]} built: {e}"[:300]
        del harnesses
        h = None  # the last one built would otherwise hold its GiBs into the next batch
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
        out["batches"][str(b)] = rows
        log(f"step batch {b}: " + ", ".join(f"{m} {r.get('images_per_s', float('nan')):.1f} img/s"
                                             for m, r in rows.items() if isinstance(r, dict)))
    out["elapsed_s"] = round(clock.since(start), 1)
    return out


def summarise(h, device: torch.device) -> dict:
    """A harness's timings, plus the host syncs and FLOPs of one more step."""
    from glsd.train.pretrain import train_step

    s = h.summary()
    s.pop("match_ms"), s.pop("match_share")
    step = min(h.step0 + h.calls, h.ctx.sched.total_steps - 1)
    s["syncs"] = count_syncs(lambda: train_step(h.ctx, h.batch, step, want_stats=False), device)
    sync(device)
    s["flops_per_step"] = flops_of(lambda: h.step(timed=False))
    s["achieved_flops_per_s"] = ratio(s["flops_per_step"], s["step_ms"] / 1e3)
    if device.type == "cuda":
        # the process's peak with every arm of this batch built and stepped in turn
        s["peak_memory_gib_all_arms"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return s


def timm_step_fn(args, batch: int):
    """timm's plain supervised step on the preset's backbone: (step function, model)."""
    import timm

    from glsd.models.backbone import timm_kwargs
    from glsd.utils.device import resolve_precision

    cfg = paper_config(args, batch, "none")
    size = cfg.crops.global_size
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=1000,
                              **timm_kwargs(cfg.model, size)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.04, foreach=True)
    amp = resolve_precision(cfg.train.precision, args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(args.device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(args.device)
    clip = cfg.train.clip_grad

    def step():
        with torch.autocast(args.device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    return step, model


def part_timm(args, clock: Clock, step_part: dict) -> dict:
    """(b): timm's step at each batch, and glsd's achieved FLOP/s over it."""
    start, out = time.perf_counter(), {"budget_s": args.budget_timm, "batches": {}}
    for b in args.batches:
        if clock.since(start) > args.budget_timm:
            out["batches"][str(b)] = {"skipped": "time guard"}
            continue
        try:
            fn, model = timm_step_fn(args, b)
            for _ in range(args.warmup):
                fn()
            secs = []
            for _ in range(args.steps):
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                secs.append(time.perf_counter() - t)
                if clock.since(start) > args.budget_timm:
                    break
            flops = flops_of(fn)
            syncs = count_syncs(fn, args.device)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            out["batches"][str(b)] = {"error": f"out of memory: {e}"[:300]}
            continue
        finally:
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        step_s = median(secs)
        row = {"images_per_s": ratio(b, step_s), "step_ms": 1e3 * step_s,
               "step_ms_all": [round(1e3 * s, 2) for s in secs], "flops_per_step": flops,
               "achieved_flops_per_s": ratio(flops, step_s), "syncs": syncs,
               "n_params": sum(p.numel() for p in model.parameters())}
        glsd = step_part.get("batches", {}).get(str(b), {})
        row["flops_ratio_glsd_over_timm"] = {m: ratio(r["achieved_flops_per_s"], row["achieved_flops_per_s"])
                                             for m, r in glsd.items() if isinstance(r, dict) and "achieved_flops_per_s" in r}
        out["batches"][str(b)] = row
        del fn, model
        log(f"timm batch {b}: {row['images_per_s']:.1f} img/s; glsd FLOP/s over timm's "
            f"{row['flops_ratio_glsd_over_timm']}")
    out["elapsed_s"] = round(clock.since(start), 1)
    return out


def compile_child(args) -> dict:
    """In the child: eager and compiled harnesses at one batch, compile time and speed-up."""
    from glsd.tools.bench.harness import build_harness

    b, mode = args.batches[0], args.compile_mode
    cfg = paper_config(args, b, args.modes[0])
    batch = device_batch(cfg, args.device)
    eager = build_harness("eager", cfg, args.device, batch, steps_per_epoch=1000)
    comp = build_harness("compiled", cfg, args.device, batch, steps_per_epoch=1000)
    kw = {"dynamic": False, "backend": args.compile_backend}
    if args.compile_backend == "inductor":
        kw["mode"] = mode
    for net in (comp.ctx.student, comp.ctx.teacher):  # heads and loss stay eager
        net.backbone = torch.compile(net.backbone, **kw)
    for _ in range(args.warmup):
        eager.step(timed=False)
    first = []
    t = time.perf_counter()
    for _ in range(2):  # the two resolutions compile in the first step; the second checks recompiles
        comp.step(timed=False)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
    for _ in range(max(0, args.warmup - 2)):
        comp.step(timed=False)
    for r in range(args.steps):
        for h in ((eager, comp) if r % 2 == 0 else (comp, eager)):
            h.step()
    e, c = eager.summary(), comp.summary()
    return {"mode": mode, "backend": args.compile_backend, "batch_size": b, "matching": args.modes[0],
            "compile_s": first[0] - c["step_ms"] / 1e3, "first_steps_s": first,
            "eager_images_per_s": e["images_per_s"], "compiled_images_per_s": c["images_per_s"],
            "eager_step_ms_all": e["step_ms_all"], "compiled_step_ms_all": c["step_ms_all"],
            "speedup": ratio(c["images_per_s"], e["images_per_s"])}


def part_compile(args, clock: Clock, argv: list[str]) -> dict:
    """(c): each compile mode in a child process with a hard timeout."""
    start, out = time.perf_counter(), {"budget_s": args.budget_compile, "timeout_per_mode_s": args.compile_timeout,
                                       "static_shapes": True, "modes": {}}
    for mode in args.compile_modes:
        left = args.budget_compile - clock.since(start)
        if left < 60:  # Swin-T did not finish compiling in 225 s on an H200: less is no attempt
            out["modes"][mode] = {"skipped": "time guard"}
            continue
        timeout = min(args.compile_timeout, left)
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "compile.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--compile-child", mode, "--out", str(res)]
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if proc.returncode == 0 and res.exists():
                    out["modes"][mode] = json.loads(res.read_text())
                else:
                    out["modes"][mode] = {"error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}
            except subprocess.TimeoutExpired as e:
                tail = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")[-400:]
                out["modes"][mode] = {"error": f"did not finish within {timeout:.0f} s (compile + "
                                               f"{args.warmup} warm-up + {args.steps} timed steps)",
                                      "stderr_tail": tail}
            out["modes"][mode]["wall_s"] = round(time.perf_counter() - t, 1)
        log(f"compile {mode}: {out['modes'][mode].get('speedup', out['modes'][mode].get('error'))}")
    out["elapsed_s"] = round(clock.since(start), 1)
    return out


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of the paper step")
    ap.add_argument("--out", help="write the JSON here (rewritten after each part)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--modes", default="none,geometric,similarity", help="matchings of (a); (c) uses the first")
    ap.add_argument("--parts", default="step,timm,compile")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget-step", type=float, default=180.0, help="seconds for (a)")
    ap.add_argument("--budget-timm", type=float, default=60.0, help="seconds for (b)")
    ap.add_argument("--budget-compile", type=float, default=240.0, help="seconds for (c)")
    ap.add_argument("--compile-timeout", type=float, default=150.0, help="seconds per compile mode (child killed)")
    ap.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs")
    ap.add_argument("--compile-batch", type=int, default=64)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny Swin, batch 2, 1 step each, compile with backend=eager")
    ap.add_argument("--compile-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.batches, args.warmup, args.steps = "cpu", "2", 1, 1
        args.compile_batch, args.compile_backend, args.compile_modes = 2, "eager", "default"
        args.threads = args.threads or 1
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    args.parts = [p for p in args.parts.split(",") if p]
    args.compile_modes = [m for m in args.compile_modes.split(",") if m]
    if set(args.parts) - {"step", "timm", "compile"}:
        ap.error(f"unknown part in --parts {args.parts}: use step, timm, compile")
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_limit: no CUDA device visible; --dry-run checks the code path on the CPU", file=sys.stderr)
        return 1
    if args.compile_child:
        args.compile_mode, args.batches = args.compile_child, [args.compile_batch]
        write_json(finite(compile_child(args)), args.out)
        return 0
    clock = Clock()
    result = {"schema": SCHEMA, "command": shlex.join(["python", "benchmarks/gpu_limit.py", *argv]),
              "dry_run": args.dry_run, "preset": PAPER_PRESET,
              "config_overrides": [*PAPER_STEP, *(DRY if args.dry_run else []), *args.overrides],
              "env": environment(args.device), "batches": args.batches, "modes": args.modes,
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              # images reach the device as uint8 squares of this side (the committed H200 bench: 256)
              "decode_size": decode_size(paper_config(args, args.batches[0], args.modes[0]).crops),
              "note": "images/s of train_step incl. device augmentation from uint8 images on the device; "
                      "host_syncs: CUDA runtime sync events of one step (profiler)"}
    child_argv, skip = [], False
    for a in argv:  # the child writes its own --out
        if not skip and not a.startswith("--out"):
            child_argv.append(a)
        skip = a == "--out"
    text = write_json(finite(result), args.out)  # what is known before the first part
    for part in args.parts:
        if part == "step":
            result["step"] = part_step(args, clock)
        elif part == "timm":
            result["timm"] = part_timm(args, clock, result.get("step", {}))
        else:
            result["compile"] = part_compile(args, clock, child_argv)
        result["elapsed_s"] = round(clock.since(clock.t0), 1)
        text = write_json(finite(result), args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
