"""The pretraining data pipeline: source -> recorded subset -> multi-crop dataset -> loader.

Determinism: the order of an epoch is a seeded permutation cut into global batches, and each
sample's views are drawn from (seed, epoch, position in the epoch, dataset index) only
(:func:`glsd.data.view_params.training_seed`). So a run resumed mid-epoch, with any number
of loader workers or processes, and with its views made in the workers or on the device
(``data.augment_on``), sees exactly the views an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler

from glsd.config import Config, ConfigError
from glsd.data.multicrop import Batch, DecodeToSquare, MultiCropDataset, ViewCollate, decode_size
from glsd.data.views import ViewMaker
from glsd.data.sources import ImageSource, balanced_subset, open_source
from glsd.utils.io import atomic_write

SUBSET_FILE = "subset.json"


def select_images(cfg: Config, run_dir: Optional[Path],
                  source: Optional[ImageSource] = None) -> tuple[ImageSource, ImageSource]:
    """(full train source, pretraining subset). A recorded subset in the run folder wins, so
    reruns and evaluation use exactly the same images."""
    source = open_source(cfg.data) if source is None else source
    record = run_dir / SUBSET_FILE if run_dir is not None else None
    recorded = read_subset(record) if record is not None else None
    if recorded is not None:
        keys = recorded["keys"]
    else:
        keys = balanced_subset(source, cfg.data.fraction, cfg.data.num_images, cfg.data.subset_seed)
    return source, source.subset(keys)


def read_subset(path: Path) -> Optional[dict]:
    """A run's ``subset.json`` as a dict, None if absent; a malformed file is an error (its
    images could not be known, and guessing would pretrain or evaluate on others)."""
    if not path.is_file():
        return None
    fix = ("delete it: pretraining then draws its subset afresh (data.fraction, "
           "data.subset_seed) and evaluation uses the whole train split")
    try:
        subset = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # bad JSON, bad UTF-8, unreadable
        raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(subset, dict) or not isinstance(subset.get("keys"), list):
        raise ConfigError(f"{path} has no 'keys' list; {fix}")
    return subset


def write_subset(path: Path, subset: ImageSource, split: str) -> None:
    payload = {"source": subset.name, "split": split, "n_images": len(subset),
               "classes": subset.classes, "keys": subset.keys, "labels": subset.labels}
    data = json.dumps(payload).encode()
    # Atomic: other ranks (and reruns) may read it while it is written.
    atomic_write(Path(path), lambda f: f.write(data))


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation cut into global batches; rank r takes slice r of each.

    The global batch k is ``perm[k*G:(k+1)*G]`` with ``G = batch_size * world_size`` whatever
    the world size, so 2 processes x B see the same images per step as 1 process x 2B, and a
    resume skips the samples already consumed (``start_sample``) without loading them.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.start_sample = 0, 0
        if self.n < self.global_batch:
            raise ConfigError(f"{self.n} images are fewer than one global batch of {self.global_batch}; "
                              "lower train.batch_size or use more data")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start_sample = epoch, start_sample

    def _my_samples(self) -> list[tuple[int, int]]:
        """(position in the epoch, dataset index) of this rank's samples, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        used = self.steps_per_epoch * self.global_batch
        perm = torch.randperm(self.n, generator=g)[:used]
        first = self.start_sample // self.global_batch
        batches = perm.view(-1, self.world, self.batch)[first:, self.rank].flatten()
        positions = torch.arange(used).view(-1, self.world, self.batch)[first:, self.rank].flatten()
        return list(zip(positions.tolist(), batches.tolist()))

    def __iter__(self):
        # (epoch, position, index): the epoch travels with each sample, so loader workers can
        # persist across epochs, and the views are seeded by what the sample is, not by where
        # (which rank, which batch) it is loaded.
        return iter([(self.epoch, p, i) for p, i in self._my_samples()])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_sample // self.global_batch) * self.batch


def makes_views_on_device(cfg: Config) -> bool:
    """``data.augment_on``: ``device`` makes the views on the training device; ``cpu`` (and
    its alias ``cpu_batched``) in the loader workers. The views are the same."""
    return cfg.data.augment_on == "device"


def build_loader(cfg: Config, subset: ImageSource, rank: int, world_size: int,
                 pin_memory: bool) -> tuple[DataLoader, ResumableSampler]:
    """(loader of :class:`Batch`, sampler). Views are made in the workers or, with
    ``data.augment_on=device``, by :class:`StepViews` in the training step.

    Workers persist across epochs: on a small subset a re-fork per epoch cost seconds every
    few dozen steps (the sampler hands each sample its epoch, see ResumableSampler)."""
    decode = DecodeToSquare(decode_size(cfg.crops), cfg.crops.interpolation)
    dataset = MultiCropDataset(subset, decode, cfg.data.on_error)
    sampler = ResumableSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world_size)
    collate = ViewCollate(cfg.crops, cfg.train.seed, make_views=not makes_views_on_device(cfg))
    # Its own generator: each new iterator draws a base seed from it, and drawing from the
    # global RNG would shift the model's random stream (drop-path) on a mid-epoch resume.
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=pin_memory, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        persistent_workers=cfg.data.num_workers > 0)
    return loader, sampler


class StepViews:
    """A batch's views and geometry on the training device, wherever they were made: moved
    there when the workers made them, made there (same parameters, same code) otherwise."""

    def __init__(self, cfg: Config):
        self.maker = ViewMaker(cfg.crops)

    def __call__(self, batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        geometry = batch.geometry.to(device, non_blocking=True)
        if batch.views is not None:
            return [v.to(device, non_blocking=True) for v in batch.views], geometry
        return self.maker(batch.images.to(device, non_blocking=True), batch.params), geometry
