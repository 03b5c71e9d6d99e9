"""The ``glsd`` command line: pretrain, eval, study, bench, pictures, discovery.

Import-light: torch, torchvision and timm are imported by the commands that need them, so
``glsd --help`` and ``glsd presets`` answer at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from glsd import commands
from glsd.config import EVALUATIONS, MATCHINGS, ConfigError
from glsd.errors import (DiskFull, GlsdError, NonFiniteError, OutOfMemory, RankFailed, TrainingInterrupted,
                         WorkerDied, is_out_of_memory)

# Errors of a run that started and failed (exit 1), not of its input (exit 2): a scheduler may retry these.
FAILED_RUN = (NonFiniteError, OutOfMemory, WorkerDied, DiskFull, RankFailed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glsd", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error too (or set GLSD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_pretrain(sub)
    _add_use_of_backbones(sub)
    _add_study_and_bench(sub)
    _add_inspection(sub)
    _add_pictures(sub)
    return parser


def _add_pretrain(sub) -> None:
    """The subcommands of pretraining."""
    p = sub.add_parser("pretrain", help="pretrain a backbone (resumes if the run folder has a checkpoint)")
    p.add_argument("config", help="preset name (see `glsd presets`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. train.epochs=5")
    p.set_defaults(func=commands.cmd_pretrain)


def _add_use_of_backbones(sub) -> None:
    """The subcommands of evaluating, embedding and exporting a backbone."""
    p = sub.add_parser("eval", help="evaluate a run folder or an exported backbone.safetensors")
    p.add_argument("kind", choices=EVALUATIONS,
                   help="seg: linear probe of local features on labelled mosaics (eval.seg_*)")
    p.add_argument("path", help="run folder, backbone.safetensors, checkpoint .pt or export folder")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides (eval.k=10, eval.model=student, ...)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate a randomly initialised backbone of the same architecture (the floor)")
    p.add_argument("--student", action="store_true", help="student weights (default: eval.model, the teacher)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-data", metavar="X", help="another labelled set (folder, zip or dataset "
                   "name; its data.split, default train): replaces the run's data and subset")
    p.add_argument("--test-data", metavar="Y", help="labelled test set (its eval.test_split; "
                   "default: --train-data, else the run's data)")
    p.add_argument("--json", action="store_true", help="print the full JSON record (always written "
                   "to RUN_DIR/eval/<kind>[-student|-random-init][-epochNNNN][-on-<data>][-<setting>].json; its path is printed, or is the JSON's output field with --json)")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("embed", help="features of every image of a data source, to .safetensors/.npy + a CSV index")
    p.add_argument("source", help="run folder, checkpoint .pt, backbone.safetensors or export folder")
    p.add_argument("data", help="image folder, flat folder, .zip, or cifar10 / cifar100 / stl10 / "
                   "fashion_mnist / synthetic / sample")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides: data.split=test, "
                   "data.source=folder, data.root=DIR (datasets), eval.image_size=..., ...")
    p.add_argument("--out", required=True, help="FILE.safetensors or FILE.npy (FILE.csv is the index)")
    p.add_argument("--local", action="store_true", help="also the pooled local features")
    p.add_argument("--batch-size", type=int, help="images per batch (default eval.batch_size)")
    p.add_argument("--student", action="store_true", help="student weights (default: eval.model, the teacher)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=commands.cmd_embed)

    p = sub.add_parser("export", help="write RUN_DIR/export/timm/ (config.json + model.safetensors) for plain timm")
    p.add_argument("path", help="run folder, backbone.safetensors or checkpoint .pt")
    p.add_argument("--out", help="folder to write (default RUN_DIR/export/timm; RUN_DIR/export/epochNNNN for an earlier checkpoint)")
    p.set_defaults(func=commands.cmd_export)


def _add_study_and_bench(sub) -> None:
    """The subcommands of the study and the benchmark."""
    p = sub.add_parser("study", help="compare matchings (none / similarity / geometric / soft_geometric / hybrid) over data fractions and seeds")
    p.add_argument("config", help="preset name or YAML path (its study: section gives the default grid)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every cell")
    p.add_argument("--out", required=True, help="study folder (rerun to resume)")
    # Typed after parsing: a key=value written after a list (--seeds 0 1 a.b=2) is an override.
    p.add_argument("--fractions", nargs="+", metavar="F")
    p.add_argument("--matchings", nargs="+", metavar="{" + ",".join(MATCHINGS) + "}")
    p.add_argument("--seeds", nargs="+", metavar="S")
    p.add_argument("--evals", nargs="+", metavar="{" + ",".join(EVALUATIONS) + "}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--report-only", action="store_true",
                   help="write results.json / report.md / report.png from the finished cells; train nothing")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells trained at once, each in its own process with its share of the CPU cores")
    p.set_defaults(func=commands.cmd_study)

    p = sub.add_parser("bench", help="measure geometry, data pipeline, step, utilisation and k-NN speed (one JSON object)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the preset")
    p.add_argument("--preset", default="cpu-default", help="preset name or YAML path (default: cpu-default)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--data", metavar="PATH",
                   help="a folder or zip of real images: the data section measures decoding them, and "
                        "a preset whose images come from data.root and that has none trains on them (needed for step/data/utilisation then)")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, one or two timed iterations")
    p.add_argument("--sections", help="comma-separated subset of geometry,step,data,utilisation,knn")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the backbone")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    p.set_defaults(func=commands.cmd_bench)


def _add_inspection(sub) -> None:
    """The subcommands of presets, configs and backbones before a run."""
    p = sub.add_parser("presets", help="list the shipped presets, one line each")
    p.set_defaults(func=commands.cmd_presets)

    p = sub.add_parser("config", help="dry run: print the resolved, validated config and its feature grids")
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    p.set_defaults(func=commands.cmd_config)

    p = sub.add_parser("backbones", help="timm models matching a pattern, with the grid each gives per crop size")
    p.add_argument("pattern", nargs="?", help="wildcard pattern ('resnet*'; a bare word matches anywhere)")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 96], metavar="PX",
                   help="crop sizes to probe (default: 224 96)")
    p.add_argument("--limit", type=int, default=40, help="list at most this many models (0: all)")
    p.set_defaults(func=commands.cmd_backbones)


def _add_pictures(sub) -> None:
    """The subcommands of pictures."""
    p = sub.add_parser("show-matches", help="picture: geometric and similarity matches between two crops")
    p.add_argument("items", nargs="*", metavar="[RUN_DIR] [key=value]",
                   help="a run folder (its teacher; omit it for a random backbone of --config) and "
                        "config overrides, e.g. crops.local_size=16 loss.match_threshold=none")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--config", help="preset or YAML for a random-init backbone when no run folder is given")
    p.add_argument("--seed", type=int, default=0, help="draws the two crops")
    p.add_argument("--student-view", choices=["local", "global"],
                   help="the student crop (default: local if the config has local crops)")
    p.add_argument("--random-init", action="store_true", help="the run's architecture with fresh weights")
    p.set_defaults(func=commands.cmd_picture)

    p = sub.add_parser("show-features", help="picture: PCA of local features and the CLS attention (ViT)")
    p.add_argument("run_dir", help="run folder (or backbone.safetensors)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides (eval.image_size=..., ...)")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--random-init", action="store_true", help="the run's architecture with fresh weights")
    p.set_defaults(func=commands.cmd_picture)

    p = sub.add_parser("plot", help="picture: training curves of several runs overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--x", choices=("step", "epoch"), default="step",
                   help="x axis: epoch compares runs of other batch sizes (or a run resumed under "
                        "another world size, whose steps count batches of another size)")
    p.set_defaults(func=commands.cmd_picture)

def parse_args(argv=None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` written after a flag (``glsd eval knn RUN
    --train-data X eval.k=10``) is an override, as it is before the flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    into = "overrides" if hasattr(args, "overrides") else "items" if hasattr(args, "items") else None
    if extra and (into is None or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # show-matches takes its overrides among its items (after an optional RUN_DIR)
        setattr(args, into, [*getattr(args, into), *extra])
    return args


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself): stop like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 a failed run (non-finite training, out of memory, a dead loader
    worker, a full disk), 2 bad input (a GlsdError:
    one message, no traceback unless --debug or GLSD_DEBUG=1), 128 + N stopped by signal N
    (130 SIGINT, 143 SIGTERM; a training run checkpoints first)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GLSD_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    previous = _install_sigterm()
    try:
        args = parse_args(argv)
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _in_glsd_voice(warnings.showwarning)
            return args.func(args)
    except TrainingInterrupted as e:  # checkpointed; rerunning resumes
        print(f"glsd: {e}", file=sys.stderr)
        return 128 + e.signal
    except (KeyboardInterrupt, _Terminated) as e:
        sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        print(f"glsd: interrupted by {sig.name}; nothing of this command was finished", file=sys.stderr)
        return 128 + int(sig)
    except GlsdError as e:
        return _report(e, debug)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return _report(OutOfMemory(
            f"out of memory ({str(e).splitlines()[0][:160] if str(e) else 'no detail'}); lower this "
            "command's batch size (eval.batch_size, --batch-size, train.batch_size) or run it on "
            "a device with more memory"), debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report(e: GlsdError, debug: bool) -> int:
    """One line for the user (the traceback of the error being handled with --debug); the
    exit code: 1 a failed run, 2 bad input."""
    if debug:
        import traceback

        traceback.print_exc()
    kind = "config error: " if isinstance(e, ConfigError) else ""
    print(f"glsd: {kind}{_message(e)}", file=sys.stderr)
    return 1 if isinstance(e, FAILED_RUN) else 2


def _in_glsd_voice(show):
    """glsd's own warnings as one line in the tool's voice; others as ``show`` shows them."""
    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if f"{os.sep}glsd{os.sep}" in filename:
            print(f"glsd: warning: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _message(e: BaseException) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries the worker's
    traceback, of which only its last line (the original message) is kept."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(("glsd.", type(e).__name__)) else last
    return text


def _install_sigterm():
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (tests calling main() from a thread)
        return None


if __name__ == "__main__":
    sys.exit(main())
