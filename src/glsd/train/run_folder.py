"""The run folder: config.yaml, metrics.jsonl, train.log, checkpoints/, backbone.safetensors.

Guards against the costly mistakes: resuming a run under a config that changes what is
learned (refused, naming the keys) and silently overwriting another run.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from glsd.config import Config, ConfigError, diff_keys, dump_yaml, from_dict, identity
from glsd.train.checkpoint import load_checkpoint

LOG = logging.getLogger("glsd")


class RunFolder:
    def __init__(self, root: str | Path, is_main: bool = True):
        self.root = Path(root)
        self.is_main = is_main
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"

    # -- start / resume -----------------------------------------------------------------
    def prepare(self, cfg: Config) -> Optional[dict]:
        """Create the folder; return the checkpoint to resume from, or None for a fresh run."""
        existing = self.root / "config.yaml"
        ckpt = None
        if self.last.is_file() and cfg.train.resume:
            ckpt = self._check_resumable(cfg)
            if self.is_main:
                self._drop_metrics_after(ckpt["step"])
        elif existing.is_file() and self.is_main:
            # Nothing to resume (or resume=false): keep the old files, out of the way.
            self._archive()
        elif self.root.is_dir() and any(self.root.iterdir()) and self.is_main:
            raise ConfigError(f"output_dir {self.root} is not empty and holds no glsd run; "
                              "pick a new output_dir")
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            (self.root / "config.yaml").write_text(dump_yaml(cfg))
            self._setup_log()
        return ckpt

    def _check_resumable(self, cfg: Config) -> dict:
        ckpt = load_checkpoint(self.last)
        diffs = diff_keys(identity(from_dict(ckpt["config"])), identity(cfg))
        if diffs:
            raise ConfigError(
                f"{self.root} holds a run of another config; resuming would mix two runs. "
                f"Differing keys: {'; '.join(diffs)}. Use a new output_dir, or train.resume=false "
                "to start fresh (the old run is moved to a sub-folder, not deleted).")
        return ckpt

    def _drop_metrics_after(self, step: int) -> None:
        """A killed run logged steps its last checkpoint does not hold; they are redone."""
        path = self.root / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        path.write_text("".join(f"{line}\n" for line in kept))

    def _archive(self) -> None:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        dest, n = self.root / f"previous-{stamp}", 1
        while dest.exists():  # two restarts within a second must not collide
            n += 1
            dest = self.root / f"previous-{stamp}-{n}"
        dest.mkdir()
        for item in list(self.root.iterdir()):
            if not item.name.startswith("previous-"):
                shutil.move(str(item), dest / item.name)
        print(f"glsd: moved the previous files in {self.root} to {dest}", file=sys.stderr)

    def _setup_log(self) -> None:
        LOG.setLevel(logging.INFO)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == (self.root / "train.log").resolve()
                   for h in LOG.handlers):
            handler = logging.FileHandler(self.root / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            LOG.addHandler(handler)

    # -- records ------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.root / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for h in list(LOG.handlers):
            if isinstance(h, logging.FileHandler):
                h.close()
                LOG.removeHandler(h)
