"""Step and utilisation sections: images/s of the real training step per matching and per
local-head size (interleaved step by step), FLOPs over the matmul peak, and the levers side
by side (fp32 / bf16 autocast, channels_last, fused AdamW, torch.compile behind ``--compile``).
"""
from __future__ import annotations

import torch

from glsd.config import MATCHINGS, Config, apply_overrides
from glsd.tools.bench.common import allocator_info, log, median, ratio, time_calls
from glsd.tools.bench.harness import build_harness, count_step_flops, has_conv, run_interleaved
from glsd.utils.device import resolve_precision


def head_settings(cfg: Config, quick: bool) -> list[tuple[int, int]]:
    """(local_hidden_dim, local_out_dim) pairs: the preset's first, then a lighter and a
    wider one (the local head's width is the main lever of the local loss's cost)."""
    m = cfg.model
    preset = (m.local_hidden_dim or m.hidden_dim, m.local_out_dim or m.out_dim)
    if quick:
        return [preset, (max(8, preset[0] // 2), max(8, preset[1] // 2))]
    others = [(64, 256), (512, 1024)]
    return [preset] + [s for s in others if s != preset]


def bench_step(cfg: Config, device: torch.device, quick: bool, batch) -> dict:
    warmup, reps = (1, 2) if quick else (2, 5)
    harnesses = []
    for mode in MATCHINGS:
        c = apply_overrides(cfg, [f"loss.matching={mode}"])
        harnesses.append(build_harness(mode, c, device, batch))
    heads = head_settings(cfg, quick)
    for hidden, out in heads[1:]:
        c = apply_overrides(cfg, ["loss.matching=geometric", f"model.local_hidden_dim={hidden}",
                                  f"model.local_out_dim={out}"])
        harnesses.append(build_harness(f"geometric_local{hidden}x{out}", c, device, batch))
    log(f"step: {len(harnesses)} configurations, {warmup} warm-up + {reps} timed steps each")
    run_interleaved(harnesses, warmup, reps)
    by_name = {h.name: h.summary() for h in harnesses}
    modes = {m: by_name[m] for m in MATCHINGS}
    flops = {m: count_step_flops(h) for h, m in zip(harnesses[:len(MATCHINGS)], modes)}
    for m in modes:
        modes[m]["flops_per_step"] = flops[m]
        modes[m]["gflops_per_image"] = flops[m] / cfg.train.batch_size / 1e9
    none_ips = modes["none"]["images_per_s"]
    head_rows = []
    for i, (hidden, out) in enumerate(heads):
        name = "geometric" if i == 0 else f"geometric_local{hidden}x{out}"
        row = by_name[name]
        head_rows.append({"local_hidden_dim": hidden, "local_out_dim": out,
                          "images_per_s": row["images_per_s"], "step_ms": row["step_ms"],
                          "match_share": row["match_share"],
                          "ratio_over_none": ratio(none_ips, row["images_per_s"])})
    m = cfg.model
    return {
        "batch_size": cfg.train.batch_size, "precision": str(harnesses[0].ctx.amp_dtype or "fp32"),
        "backbone": m.backbone, "warmup_steps": warmup, "timed_steps": reps,
        "note": "real train_step (want_stats=False, as on non-logging steps) on one fixed batch; "
                "configurations interleaved step by step",
        "modes": modes,
        "ratio_geometric_over_none": ratio(none_ips, modes["geometric"]["images_per_s"]),
        "ratio_similarity_over_none": ratio(none_ips, modes["similarity"]["images_per_s"]),
        **{f"ratio_{m}_over_none": ratio(none_ips, modes[m]["images_per_s"])
           for m in MATCHINGS if m not in ("none", "similarity", "geometric")},
        "match_share_geometric": modes["geometric"]["match_share"],
        "match_share_similarity": modes["similarity"]["match_share"],
        "local_head": head_rows,
    }


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    secs = median(time_calls(lambda: a @ b, reps, warmup=2, device=device))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": secs,
            "flops_per_s": 2 * n ** 3 / secs}


def bench_utilisation(cfg: Config, device: torch.device, quick: bool, batch, compile_model: bool) -> dict:
    n = 256 if quick else 2048
    reps = 3 if quick else 5
    peaks = {"fp32": matmul_peak(device, n, torch.float32, reps),
             "bf16": matmul_peak(device, n, torch.bfloat16, reps)}
    # NCHW unless the variant says otherwise: channels_last is one of the levers compared.
    nchw = ["model.channels_last=false"]
    fp32 = build_harness("fp32", apply_overrides(cfg, [*nchw, "train.precision=fp32"]), device, batch)
    conv = has_conv(fp32.ctx.student.backbone)
    bf16 = [*nchw, "train.precision=bf16"]
    variants: list[tuple[str, list[str], dict]] = [
        ("bf16", bf16, {}),
        ("bf16_fused_adamw", bf16, {"fused_adamw": True}),
    ]
    if conv:
        variants.append(("bf16_channels_last", ["train.precision=bf16", "model.channels_last=true"], {}))
    if compile_model:
        variants.append(("bf16_compile", bf16, {"compile_model": True}))
    harnesses = [fp32] + [build_harness(name, apply_overrides(cfg, ov), device, batch, **kw)
                          for name, ov, kw in variants]
    warmup, timed = (1, 2) if quick else (2, 4)
    if compile_model:
        warmup += 1  # compilation happens in the first steps (two view sizes)
    log(f"utilisation: {len(harnesses)} variants, {warmup} warm-up + {timed} timed steps each")
    run_interleaved(harnesses, warmup, timed)
    flops = count_step_flops(harnesses[0])
    rows = {}
    for h in harnesses:
        s = h.summary()
        dtype = "bf16" if h.ctx.amp_dtype == torch.bfloat16 else "fp32"
        achieved = ratio(flops, s["step_ms"] / 1e3)
        rows[h.name] = {"images_per_s": s["images_per_s"], "step_ms": s["step_ms"],
                        "achieved_flops_per_s": achieved, "peak": dtype,
                        "utilisation": ratio(achieved, peaks[dtype]["flops_per_s"])}
    base = rows["fp32"]["images_per_s"]
    for r in rows.values():
        r["speedup_over_fp32"] = ratio(r["images_per_s"], base)
    opt = bench_optimizer_step(cfg, device, quick, batch)
    return {
        "flops_per_step": flops, "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one step",
        "matmul_peak": peaks, "variants": rows, "channels_last_applicable": conv,
        "compile": "measured" if compile_model else "off (pass --compile)",
        "default_precision": str(resolve_precision(cfg.train.precision, device) or "fp32"),
        "optimizer_step": opt, "allocator": allocator_info(),
    }


def bench_optimizer_step(cfg: Config, device: torch.device, quick: bool, batch) -> dict:
    """optimizer.step alone: foreach vs fused AdamW on the student's parameters."""
    from glsd.models.heads import build_network
    from glsd.train.optim import param_groups

    net = build_network(cfg).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(net), lr=1e-4, **kw)
        out[f"{name}_ms"] = 1e3 * median(time_calls(opt.step, 5 if quick else 20, warmup=2, device=device))
    out["speedup_fused"] = ratio(out["foreach_ms"], out["fused_ms"])
    out["n_params"] = sum(p.numel() for p in net.parameters())
    return out
