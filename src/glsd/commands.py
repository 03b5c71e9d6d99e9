"""What each ``glsd`` subcommand does, given its parsed arguments (:mod:`glsd.cli` holds the
command line's grammar, error messages and exit codes). Each imports the heavy parts it needs
when it runs, so ``glsd --help`` and ``glsd presets`` answer at once.
"""
from __future__ import annotations

import json
import sys

from glsd.config import EVALUATIONS, MATCHINGS, ConfigError, load_config


def cmd_pretrain(args) -> int:
    from glsd.train.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    run_dir = pretrain(cfg)
    print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from glsd.eval.runner import headline, run_eval

    from glsd.utils.distributed import cleanup, init_distributed
    from glsd.utils.device import device_type

    # Under torchrun every rank extracts a shard of the features; alone this is a no-op.
    dinfo = init_distributed(device_type(args.device))
    try:
        result = run_eval(args.kind, args.path, args.overrides, random_init=args.random_init,
                          device=args.device, which="student" if args.student else None,
                          train_data=args.train_data, test_data=args.test_data)
    finally:
        cleanup()
    if dinfo.is_main:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(headline(result))
            print(f"full record: {result['output']}")
    return 0


def cmd_embed(args) -> int:
    from glsd.embedding import embed, summary

    result = embed(args.source, args.data, args.out, local=args.local, device=args.device,
                   batch_size=args.batch_size, overrides=args.overrides,
                   which="student" if args.student else None)
    print(summary(result))
    return 0


def cmd_export(args) -> int:
    from glsd.export import export_run

    out = export_run(args.path, args.out)
    print(f"wrote {out} (config.json, model.safetensors; README.md has the plain-timm lines)")
    return 0


STUDY_LISTS = {"fractions": float, "seeds": int,
               "matchings": MATCHINGS, "evals": EVALUATIONS}


def study_lists(args) -> None:
    """Type the grid lists; key=value tokens that argparse put in a list are overrides."""
    for name, kind in STUDY_LISTS.items():
        values = getattr(args, name)
        if not values:
            continue
        args.overrides += [v for v in values if "=" in v]
        values = [v for v in values if "=" not in v]
        if not values:
            raise ConfigError(f"glsd study --{name} needs at least one value")
        if isinstance(kind, tuple):
            bad = [v for v in values if v not in kind]
            if bad:
                raise ConfigError(f"glsd study --{name} {bad[0]!r} is not one of {', '.join(kind)}")
        else:
            try:
                values = [kind(v) for v in values]
            except ValueError:
                raise ConfigError(f"glsd study --{name} takes {kind.__name__} values, got {values}") from None
        setattr(args, name, values)


def cmd_study(args) -> int:
    from glsd.tools.study import run_study

    study_lists(args)
    result = run_study(args.config, args.out, args.overrides, args.fractions, args.matchings,
                       args.seeds, args.evals, args.device, report_only=args.report_only,
                       jobs=args.jobs)
    failed = [r["name"] for r in result["records"] if r.get("status") == "failed"]
    print(f"study folder: {args.out} (results.json, report.md, report.png)")
    if failed:
        print(f"failed cells: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_presets(args) -> int:
    from glsd.discovery import preset_lines

    print("\n".join(preset_lines()))
    return 0


def cmd_config(args) -> int:
    from glsd.discovery import config_dry_run

    print(config_dry_run(args.config, args.overrides))
    return 0


def cmd_backbones(args) -> int:
    from glsd.discovery import backbone_lines

    for line in backbone_lines(args.pattern, args.sizes, args.limit):
        print(line, flush=True)
    return 0


def split_run_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """``[RUN_DIR] [key=value ...]`` -> (run dir or None, overrides); an existing path wins."""
    from pathlib import Path

    runs = [i for i in items if "=" not in i or Path(i).exists()]
    if len(runs) > 1:
        raise ConfigError(f"give at most one run folder, got {', '.join(runs)}")
    return (runs[0] if runs else None), [i for i in items if i not in runs]


def cmd_picture(args) -> int:
    """show-matches, show-features and plot: one error path for their input problems."""
    from glsd.tools import viz

    try:
        if args.command == "show-matches":
            run_dir, overrides = split_run_and_overrides(args.items)
            out = viz.show_matches(args.image, args.out, run_dir, args.config, overrides, args.seed,
                                   args.student_view, args.random_init)
        elif args.command == "show-features":
            out = viz.show_features(args.run_dir, args.image, args.out, args.overrides,
                                    random_init=args.random_init)
        else:
            out = viz.plot_runs(args.run_dirs, args.out, x=args.x)
    except (viz.VizError, viz.MatplotlibMissing) as e:
        print(f"glsd: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from glsd.tools.bench import run_bench, write_json

    sections = [s for s in (args.sections or "").split(",") if s] or None
    result = run_bench(args.preset, args.overrides, quick=args.quick, sections=sections,
                       compile_model=args.compile, threads=args.threads, data=args.data)
    print(write_json(result, args.out))
    return 0
