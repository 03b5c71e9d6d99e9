"""The pretraining data pipeline: source -> recorded subset -> multi-crop dataset -> loader.

Determinism: the order of an epoch is a seeded permutation, and each sample's augmentations
are seeded by (seed, epoch, index). So a run resumed mid-epoch, with any number of loader
workers or processes, sees exactly the views an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler

from glsd.config import Config, ConfigError
from glsd.data.multicrop import MultiCrop, MultiCropDataset, collate_views
from glsd.data.sources import ImageSource, balanced_subset, open_source
from glsd.train.checkpoint import atomic_write

SUBSET_FILE = "subset.json"


def select_images(cfg: Config, run_dir: Optional[Path],
                  source: Optional[ImageSource] = None) -> tuple[ImageSource, ImageSource]:
    """(full train source, pretraining subset). A recorded subset in the run folder wins, so
    reruns and evaluation use exactly the same images."""
    source = open_source(cfg.data) if source is None else source
    record = run_dir / SUBSET_FILE if run_dir is not None else None
    if record is not None and record.is_file():
        keys = json.loads(record.read_text())["keys"]
    else:
        keys = balanced_subset(source, cfg.data.fraction, cfg.data.num_images, cfg.data.subset_seed)
    return source, source.subset(keys)


def write_subset(path: Path, subset: ImageSource, split: str) -> None:
    payload = {"source": subset.name, "split": split, "n_images": len(subset),
               "classes": subset.classes, "keys": subset.keys, "labels": subset.labels}
    data = json.dumps(payload).encode()
    # Atomic: other ranks (and reruns) may read it while it is written.
    atomic_write(Path(path), lambda f: f.write(data))


class SeededMultiCrop:
    """MultiCrop whose randomness is a function of (seed, epoch, sample index) only."""

    def __init__(self, multicrop: MultiCrop, seed: int):
        self.multicrop, self.seed = multicrop, seed

    def __call__(self, img, index: int, epoch: int = 0):
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(sample_seed % (2**63))
        random.seed(sample_seed)
        try:
            return self.multicrop(img)
        finally:  # leave the caller's RNG (dropout, drop-path) untouched
            torch.set_rng_state(torch_state)
            random.setstate(py_state)


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

    def _my_indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.global_batch]
        batches = perm.view(-1, self.world, self.batch)[self.start_sample // self.global_batch:]
        return batches[:, self.rank].flatten().tolist()

    def __iter__(self):
        # (epoch, index): the epoch travels with each sample, so loader workers can persist
        # across epochs and still seed each sample's augmentation by its epoch.
        return iter([(self.epoch, i) for i in self._my_indices()])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_sample // self.global_batch) * self.batch


def build_loader(cfg: Config, subset: ImageSource, rank: int, world_size: int,
                 pin_memory: bool, transform=None, collate_fn=collate_views):
    """(loader, sampler, transform). By default the CPU multi-crop; the device-augmentation
    path passes its own transform and collate function and shares order and resume.

    Workers persist across epochs: on a small subset a re-fork per epoch cost seconds every
    few dozen steps (the sampler hands each sample its epoch, see ResumableSampler)."""
    if transform is None:
        transform = SeededMultiCrop(MultiCrop(cfg.crops), cfg.train.seed)
    dataset = MultiCropDataset(subset, transform, cfg.data.on_error)
    sampler = ResumableSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world_size)
    # Its own generator: each new iterator draws a base seed from it, and drawing from the
    # global RNG would shift the model's random stream (drop-path) on a mid-epoch resume.
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                        pin_memory=pin_memory, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        persistent_workers=cfg.data.num_workers > 0)
    return loader, sampler, transform
