"""Multi-crop views with their crop geometry, the dataset and the collate function.

Each image becomes ``num_global`` global and ``num_local`` local views with DINO's
augmentations. The crop box and the flip are drawn first, kept as the view's geometry
(original-image pixels), then applied; so geometry is exact by construction.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from glsd.config import CropConfig
from glsd.data.geometry import make_geometry
from glsd.data.sources import ImageSource


class RandomBlur:
    """PIL Gaussian blur with a radius drawn from a range stated for 224 px crops."""

    def __init__(self, p: float, radius: tuple[float, float], size: int):
        self.p, self.lo, self.hi = p, radius[0] * size / 224, radius[1] * size / 224

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class RandomSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class MultiCrop:
    """PIL image -> (list of view tensors, geometry ``(V, 5)``), global views first."""

    def __init__(self, cfg: CropConfig):
        self.cfg = cfg
        interp = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
        self.interpolation = interp
        color = T.Compose([
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
        g, loc = cfg.global_size, cfg.local_size
        blur_g1, blur_g2, blur_l = cfg.blur_p
        self.photometric = []
        for v in range(cfg.num_global):
            extra = [RandomBlur(blur_g1 if v == 0 else blur_g2, cfg.blur_radius, g)]
            if v == 1:
                extra.append(RandomSolarize(cfg.solarize_p))
            self.photometric.append(T.Compose([color, *extra, normalize]))
        self.local_photometric = T.Compose([color, RandomBlur(blur_l, cfg.blur_radius, loc), normalize])

    def crop(self, img: Image.Image, size: int, scale) -> tuple[Image.Image, torch.Tensor]:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), list(self.cfg.ratio))
        flipped = random.random() < self.cfg.flip_p
        view = TF.resized_crop(img, top, left, h, w, [size, size], self.interpolation)
        if flipped:
            view = TF.hflip(view)
        return view, make_geometry(top, left, h, w, flipped)

    def __call__(self, img: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        c = self.cfg
        views, geoms = [], []
        for v in range(c.num_global):
            view, geom = self.crop(img, c.global_size, c.global_scale)
            views.append(self.photometric[v](view))
            geoms.append(geom)
        for _ in range(c.num_local):
            view, geom = self.crop(img, c.local_size, c.local_scale)
            views.append(self.local_photometric(view))
            geoms.append(geom)
        return views, torch.stack(geoms)


class MultiCropDataset(Dataset):
    """Items of an ImageSource through ``transform(img, index, epoch)`` -> (views, geometry,
    label, index, epoch); a bad file yields None (``on_error="skip"``, dropped and counted by
    the collate function) or raises."""

    def __init__(self, source: ImageSource, transform, on_error: str = "skip"):
        self.source, self.transform, self.on_error = source, transform, on_error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        """``key``: a position, or ``(epoch, position)`` as the training sampler yields."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        img = self.source.load(self.source.keys[i], self.on_error)
        if img is None:
            return None
        views, geometry = self.transform(img, i, epoch)
        return views, geometry, self.source.labels[i], i, epoch


@dataclass
class Batch:
    views: list[torch.Tensor]  # V tensors (B, 3, S_v, S_v), global views first
    geometry: torch.Tensor  # (V, B, 5)
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) dataset positions
    skipped: int  # unreadable images dropped from this batch

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch([v.to(device, non_blocking=non_blocking) for v in self.views],
                     self.geometry.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.indices, self.skipped)

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with pin_memory=True: page-locked tensors make the copy
        to the GPU asynchronous (a pageable one waits for the device)."""
        return Batch([v.pin_memory() for v in self.views], self.geometry.pin_memory(),
                     self.labels.pin_memory(), self.indices, self.skipped)


def collate_views(items: list) -> Optional[Batch]:
    good = [it for it in items if it is not None]
    if not good:
        return Batch([], torch.empty(0), torch.empty(0), torch.empty(0), len(items))
    n_views = len(good[0][0])
    views = [torch.stack([it[0][v] for it in good]) for v in range(n_views)]
    geometry = torch.stack([it[1] for it in good], dim=1)
    labels = torch.tensor([it[2] for it in good])
    indices = torch.tensor([it[3] for it in good])
    return Batch(views, geometry, labels, indices, len(items) - len(good))
