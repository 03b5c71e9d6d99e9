"""Tiny pretraining configs and helpers shared by the reliability, distributed and e2e tests.

Everything here is sized for a 2-core CPU: synthetic 40 px images, 32/16 px crops, a conv net
of widths 8-16 (or a 1-block ViT of width 32), heads of 64 prototypes, no loader workers.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from glsd.config import Config, dump_yaml, load_config

CONVNET = ["model.backbone=glsd_convnet",
           "model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}"]
# drop_path stays at its default (0.1) unless a test sets it, so the ViT's exact-resume tests
# draw from the global RNG (the conv net has no stochastic depth: its runs draw nothing there).
VIT = ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
       "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]

BASE = [
    "data.source=synthetic", "data.synthetic_num_images=32", "data.synthetic_num_classes=4",
    "data.num_workers=0",
    "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "train.batch_size=8", "train.precision=fp32", "train.progress=false", "train.log_every=1",
    "train.warmup_steps=0",  # the default warm-up starts at lr 0: weights would not move
    "train.max_steps=3", "device=cpu",
]

# The paper-like device step of benchmarks/gpu_bench.py in miniature: the same code path (device
# augmentation, bf16, none vs geometric) in seconds on a CPU.
TINY_DEVICE_STEP = [
    "model.backbone=vit_tiny_patch16_224", "model.patch_size=8",
    "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.global_feature=cls",
    "crops.global_size=32", "crops.local_size=16", "crops.num_global=2", "crops.num_local=2",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "model.local_out_dim=64", "model.local_hidden_dim=32",
    "train.batch_size=4", "train.precision=bf16", "data.augment_on=device", "data.source=synthetic",
]

METRIC_KEYS = ("step", "epoch", "loss", "loss_global", "loss_local", "lr", "wd", "momentum",
               "teacher_temp", "images_per_sec", "geo_valid_frac", "sim_geo_agree", "sim_dist_cells")


def tiny_overrides(output_dir, *extra: str, vit: bool = False) -> list[str]:
    return [*BASE, *(VIT if vit else CONVNET), f"output_dir={output_dir}", *extra]


def tiny_config(output_dir, *extra: str, vit: bool = False) -> Config:
    """The tiny config (later overrides win)."""
    return load_config(None, tiny_overrides(output_dir, *extra, vit=vit))


def write_config(cfg: Config, path) -> Path:
    """A YAML file that ``glsd pretrain PATH`` reads back into exactly ``cfg``."""
    path = Path(path)
    path.write_text(dump_yaml(cfg))
    return path


def read_metrics(run_dir) -> list[dict]:
    """The run's metrics.jsonl records (a line being written is skipped)."""
    from glsd.train.run_folder import read_metrics_records

    return read_metrics_records(Path(run_dir) / "metrics.jsonl")


def last_step(run_dir) -> int:
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    return steps[-1] if steps else 0


def load_last(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def state_dicts_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (or are missing on one side); empty when identical."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
    return bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def start_pretrain(config_path, *overrides: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   own_group: bool = False) -> subprocess.Popen:
    """``python -m glsd pretrain CONFIG OVERRIDES`` in a subprocess (``own_group``: the
    leader of a new process group, as a job under a scheduler or a terminal's foreground)."""
    return subprocess.Popen([sys.executable, "-m", "glsd", "pretrain", str(config_path), *overrides],
                            stdout=stdout, stderr=stderr, text=True, env=subprocess_env(),
                            start_new_session=own_group)


def wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 120.0) -> int:
    """Poll metrics.jsonl until it shows ``step`` (returns the step seen); fails if the
    process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = last_step(run_dir)
        if seen >= step:
            return seen
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"pretraining exited ({proc.returncode}) at step {seen} before "
                                 f"step {step}:\n{out}\n{err}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"no step {step} within {timeout} s")


def cli(argv: Sequence[str]) -> int:
    from glsd.cli import main

    return main(list(argv))


def modules_after_import(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the loaded modules under ``prefixes`` after ``import IMPORTS`` in a fresh
    interpreter (what an import really pulls in, unaffected by this test process)."""
    code = (f"import json, sys, {imports}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
