"""The pretraining data pipeline: source -> recorded subset -> multi-crop dataset -> loader.

Determinism: the order of an epoch is a seeded permutation cut into global batches, and each
sample's views are drawn from (seed, epoch, position in the epoch, dataset index) only
(:func:`glsd.data.view_params.training_seed`). So a run resumed mid-epoch, with any number
of loader workers or processes, and with its views made in the workers or on the device
(``data.augment_on``), sees exactly the views an uninterrupted run would have seen.
"""
from __future__ import annotations


import torch
from torch.utils.data import DataLoader, Sampler

from glsd.config import Config, ConfigError
from glsd.data.multicrop import Batch, DecodeToSquare, MultiCropDataset, ViewCollate, decode_size
from glsd.data.view_params import sample_seed
from glsd.data.views import ViewMaker
from glsd.data.workers import leave_stop_signals_to_the_trainer, stop_workers_at_exit
from glsd.data.sources import ImageSource

# How an epoch's permutation is seeded. 1: ``seed + epoch`` (runs before session 9: seed s+1's
# epoch e repeated seed s's epoch e+1, so study seeds shared shifted orders); 2: a hash of
# (seed, epoch), unrelated across seeds. A checkpoint records its rule and resumes under it.
ORDER_RULE = 2
ORDER_RULES = (1, 2)


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation cut into global batches; rank r takes slice r of each.

    The global batch k is ``perm[k*G:(k+1)*G]`` with ``G = batch_size * world_size`` whatever
    the world size, so 2 processes x B see the same images per step as 1 process x 2B, and a
    resume skips the samples already consumed (``start_sample``) without loading them.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 order_rule: int = ORDER_RULE):
        self.n, self.batch, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world_size
        self.order_rule = order_rule
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
        order_seed = self.seed + self.epoch if self.order_rule == 1 else sample_seed("order", self.seed, self.epoch)
        g = torch.Generator().manual_seed(order_seed)
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
    dataset = MultiCropDataset(subset, decode, cfg.data.on_error, cfg.data.jpeg_draft)
    sampler = ResumableSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world_size)
    collate = ViewCollate(cfg.crops, cfg.train.seed, make_views=not makes_views_on_device(cfg))
    # Its own generator: each new iterator draws a base seed from it, and drawing from the
    # global RNG would shift the model's random stream (drop-path) on a mid-epoch resume.
    stop_workers_at_exit()
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=pin_memory, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        persistent_workers=cfg.data.num_workers > 0,
                        worker_init_fn=leave_stop_signals_to_the_trainer)
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
