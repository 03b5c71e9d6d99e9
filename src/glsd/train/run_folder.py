"""The run folder: config.yaml, metrics.jsonl, train.log, checkpoints/, backbone.safetensors.

Guards against the costly mistakes: two processes in one folder (an exclusive lock, see
train.lock), resuming a run under a config that changes what is learned (refused, naming the
keys), resuming poisoned (non-finite) weights, and silently overwriting another run.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

from glsd.config import Config, ConfigError, dump_yaml, from_dict
from glsd.config_compare import diff_keys, identity
from glsd.config_files import load_yaml
from glsd.errors import CheckpointError, GlsdError
from glsd.run_layout import BACKBONE_FILE, CHECKPOINT_DIR, LAST_CHECKPOINT
from glsd.train import lock
from glsd.train.checkpoint import load_checkpoint, sweep_temp_files
from glsd.weights import nonfinite_tensors
from glsd.utils.io import atomic_write_text, raise_if_disk_full

RESUME_KEYS = ("student", "teacher", "objective", "optimizer", "scaler", "step", "epoch",
               "samples_in_epoch", "rng")
# What a start that never wrote a checkpoint leaves; a restart of the same config clears it.
START_FILES = {"config.yaml", "metrics.jsonl", "train.log", "subset.json", CHECKPOINT_DIR,
               "failed.txt", lock.LOCK_NAME}
FAILED_FILE = "failed.txt"

LOG = logging.getLogger("glsd")


class RunFolder:
    def __init__(self, root: str | Path, is_main: bool = True):
        self.root = Path(root)
        self.is_main = is_main
        self.checkpoints = self.root / CHECKPOINT_DIR
        self.last = self.root / LAST_CHECKPOINT
        self._locks = 0
        self._named_unreadable: set[str] = set()
        self.unnamed: list = []  # another rank's skipped files, not yet named by rank 0
        self._handler: Optional[logging.Handler] = None

    # -- start / resume -----------------------------------------------------------------
    def prepare(self, cfg: Config, map_checkpoint: bool = False) -> Optional[dict]:
        """Lock and create the folder; return the checkpoint to resume from, or None for a
        fresh run. Under torchrun only rank 0 (is_main) locks and writes. ``map_checkpoint``:
        read it memory-mapped (a resume onto a GPU: glsd.train.checkpoint.MAP_CHECKPOINTS)."""
        self.take_lock()
        try:
            return self._prepare(cfg, map_checkpoint)
        except BaseException:
            self.close()
            raise

    def take_lock(self) -> None:
        """Lock the folder for this process (rank 0 only; re-entrant; close() gives it back)."""
        if self.is_main:
            lock.acquire(self.root, "pretrain")
            self._locks += 1

    def _prepare(self, cfg: Config, map_checkpoint: bool) -> Optional[dict]:
        existing = self.root / "config.yaml"
        ckpt = None
        if self.is_main:
            sweep_temp_files(self.root)  # torn writes of killed runs (the lock says none is live)
        if self.last.is_file() and cfg.train.resume:
            ckpt = self._check_resumable(cfg, map_checkpoint)
            if self.is_main:
                self._drop_metrics_after(ckpt["step"])
        elif existing.is_file() and self.is_main:
            if cfg.train.resume and self._is_same_unsaved_start(cfg):
                self._clear_start()  # killed before its first checkpoint: nothing to keep
            else:  # nothing to resume (or resume=false): keep the old files, out of the way
                if cfg.train.resume:
                    self._refuse_lost_checkpoint()
                self._archive("train.resume=false" if not cfg.train.resume else
                              "it holds no checkpoint to resume")
        elif self.is_main and self.root.is_dir() and any(
                not lock.is_lock_file(p.name) for p in self.root.iterdir()):
            raise ConfigError(f"output_dir {self.root} is not empty and holds no glsd run; "
                              "pick a new output_dir")
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / "config.yaml", dump_yaml(cfg))  # evaluation trusts it
            self._setup_log()
        return ckpt

    def _check_resumable(self, cfg: Config, map_checkpoint: bool = False) -> dict:
        try:
            ckpt = load_checkpoint(self.last, mmap=map_checkpoint)
        except CheckpointError as e:
            earlier = sorted(self.checkpoints.glob("epoch*.pt"))
            copy = f", or copy {earlier[-1].name} over last.pt to resume from there" if earlier else ""
            raise CheckpointError(f"{e}. To go on: start fresh with train.resume=false (the old run "
                                  f"is moved aside, not deleted){copy}") from None
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing or not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{self.last} cannot be resumed: it lacks {', '.join(missing) or 'config'}. "
                                  "Start fresh with train.resume=false (the old run is moved aside).")
        bad = nonfinite_tensors({k: ckpt[k] for k in ("student", "teacher") if isinstance(ckpt[k], dict)})
        if bad:
            raise CheckpointError(f"{self.last} (step {ckpt['step']}) holds non-finite weights "
                                  f"({len(bad)} tensors, e.g. {bad[0]}); resuming would fail again. "
                                  "Start fresh with train.resume=false (it is moved aside, not deleted).")
        try:
            saved = from_dict(ckpt["config"])
        except ConfigError as e:  # e.g. a key of another glsd version
            raise ConfigError(f"the config saved in {self.last} cannot be read: {e}. Resume it with "
                              "the glsd version that wrote it, use a new output_dir, or "
                              "train.resume=false to start fresh (the old run is moved aside)") from None
        diffs = diff_keys(identity(saved), identity(cfg))
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
        kept = [r for r in read_metrics_records(path) if r.get("step", 0) <= step]
        # a kill now keeps the old file
        atomic_write_text(path, "".join(f"{json.dumps(r)}\n" for r in kept))

    def _is_same_unsaved_start(self, cfg: Config) -> bool:
        names = {p.name for p in self.root.iterdir() if not lock.is_lock_file(p.name)}
        if not names <= START_FILES or (self.root / BACKBONE_FILE).exists():
            return False
        if any(not p.name.startswith(".") for p in self.checkpoints.glob("*")):
            return False
        try:
            old = from_dict(load_yaml((self.root / "config.yaml").read_text()))
        except (GlsdError, yaml.YAMLError, OSError):
            return False
        return diff_keys(identity(old), identity(cfg)) == []

    def _clear_start(self) -> None:
        for name in START_FILES - {lock.LOCK_NAME}:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def mark_failed(self, error: BaseException) -> None:
        """A run that fails before its first checkpoint says so in its folder."""
        owns = self._locks and lock.holds(self.root)  # not a lock taken over while suspended
        if owns and self.root.is_dir() and not self.last.exists() and (self.root / "config.yaml").exists():
            (self.root / FAILED_FILE).write_text(
                f"this run failed before its first checkpoint: {type(error).__name__}: {error}\n"
                "Rerunning the same command starts it afresh (these files are replaced).\n")

    def _refuse_lost_checkpoint(self) -> None:
        """A run that finished (its export) or kept epoch checkpoints, but has no last.pt:
        rerunning the command must not quietly start it over. (One killed before its first
        checkpoint saved nothing: it is moved aside, saying so.)"""
        kept = sorted(self.checkpoints.glob("epoch*.pt"))
        if not kept and not (self.root / BACKBONE_FILE).exists():
            return
        steps = [r.get("step", 0) for r in read_metrics_records(self.root / "metrics.jsonl")]
        hint = (f" To resume from its last kept checkpoint, copy {kept[-1].name} to "
                f"checkpoints/last.pt." if kept else "")
        raise ConfigError(f"{self.root} holds a run that reached step {max(steps, default=0)} but "
                          f"has no checkpoints/last.pt to resume from.{hint} To train it again from "
                          "scratch: train.resume=false (its files are moved to previous-<time>/), "
                          "or a new output_dir.")

    def _archive(self, why: str) -> None:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        dest, n = self.root / f"previous-{stamp}", 1
        while dest.exists():  # two restarts within a second must not collide
            n += 1
            dest = self.root / f"previous-{stamp}-{n}"
        dest.mkdir()
        for item in list(self.root.iterdir()):
            if not item.name.startswith("previous-") and item.name != lock.LOCK_NAME:
                shutil.move(str(item), dest / item.name)
        print(f"glsd: moved the previous files in {self.root} to {dest} ({why})", file=sys.stderr)

    def _setup_log(self) -> None:
        """train.log: this run's records only (a caller's own handlers on the "glsd" logger,
        and another run's in another thread, are left alone); the logger's level is the
        caller's again when the process's last run ends (train.pretrain)."""
        if self._handler is not None:
            return
        if LOG.level == logging.NOTSET or LOG.level > logging.INFO:
            LOG.setLevel(logging.INFO)
        handler = logging.FileHandler(self.root / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        thread = threading.get_ident()
        handler.addFilter(lambda record: record.thread in (thread, None))  # None: logThreads off
        LOG.addHandler(handler)
        self._handler = handler

    # -- records ------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        if not self.is_main:
            return
        lock.check_owned(self.root)  # taken over while this process was suspended: no write
        path = self.root / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a resume drops a cut line and the steps after its checkpoint
            kept = f"{self.last} is kept" if self.last.is_file() else "no checkpoint was written yet"
            raise_if_disk_full(e, path, f"logging step {record.get('step')}; {kept}")
            raise

    def name_unreadable(self, unreadable) -> None:
        """Each file a batch skipped (data.on_error=skip), named once in train.log: by the
        trainer, since a loader worker started by spawn (macOS) has no log of its own. Only
        rank 0 has the log: another rank keeps its files in ``unnamed`` until a log step
        hands them over (:func:`glsd.train.saving.log_step`)."""
        for item in unreadable:
            if item.key not in self._named_unreadable:
                self._named_unreadable.add(item.key)
                if self.is_main:
                    LOG.warning("skipped unreadable image %r: %s", item.key, item.reason)
                else:
                    self.unnamed.append(item)

    def close(self) -> None:
        """Close train.log and give back this folder's lock (as often as it was taken)."""
        if self._handler is not None:
            LOG.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        while self._locks:
            self._locks -= 1
            lock.release(self.root)


def last_logged_step(run_dir: Path) -> Optional[int]:
    """The step of the last training record in ``run_dir``'s metrics.jsonl (None: none yet)."""
    steps = [r["step"] for r in read_metrics_records(run_dir / "metrics.jsonl") if "loss" in r]
    return steps[-1] if steps else None


def read_metrics_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none when absent); a line cut by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
