"""Loader side of the multi-crop views: decode, the dataset, the batch and its collate.

A worker decodes each image to one uint8 square (:class:`DecodeToSquare`); the collate
function stacks a batch, draws every view's parameters from each sample's own seed
(:mod:`glsd.data.view_params`) and, with ``data.augment_on=cpu``, makes the views there in one
batched pass (:class:`glsd.data.views.ViewMaker`). With ``device`` it hands the images and
the parameters on and the training process makes the same views on its device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glsd.config import CropConfig
from glsd.data.image_file import ORIGINAL_SIZE
from glsd.data.packed import PackedStrings
from glsd.data.sources import ImageSource, Unreadable
from glsd.data.view_params import ViewParams, draw_view_params, geometry, training_seed
from glsd.data.views import ViewMaker

PIL_FILTER = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_size(crops: CropConfig) -> int:
    """Side of the square every image is decoded to (``crops.decode_size``, or the default
    rule: the global crop size up to 64 px, else 8/7 of it rounded up to a multiple of 8)."""
    if crops.decode_size is not None:
        return crops.decode_size
    g = crops.global_size
    return g if g <= 64 else 8 * math.ceil(g * 8 / 7 / 8)


class DecodeToSquare:
    """PIL image -> (uint8 ``(3, S, S)``, original ``(h, w)``), resized with
    ``crops.interpolation``; nothing random. Crop boxes are normalised, so the views cut
    from the square show the regions the geometry records in original pixels."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.filter = size, PIL_FILTER[interpolation]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = img.info.get(ORIGINAL_SIZE, img.size)  # a JPEG decoded at reduced scale: its full size
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), self.filter, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return image, torch.tensor([h, w], dtype=torch.float32)


class MultiCropDataset(Dataset):
    """Items of an ImageSource -> (uint8 image, original hw, label, index, epoch, position);
    a bad file yields :class:`Unreadable` (``on_error="skip"``: dropped by the collate, named
    by the trainer) or raises."""

    def __init__(self, source: ImageSource, decode: DecodeToSquare, on_error: str = "skip",
                 jpeg_draft: bool = True):
        # The workers hold the keys and labels packed (glsd.data.packed), the source without
        # its lists: nothing per image is copied into a forked worker, or pickled into a
        # spawned one.
        self.keys, self.labels = PackedStrings(source.keys), np.asarray(source.labels, dtype=np.int64)
        self.source = replace(source, keys=[], labels=[])
        self.decode, self.on_error = decode, on_error
        self.min_size = decode.size if jpeg_draft else 0  # data.jpeg_draft

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key):
        """``key``: a dataset index, or ``(epoch, position, index)`` as the sampler yields."""
        epoch, position, i = key if isinstance(key, tuple) else (0, key, key)
        img = self.source.load_or_why(self.keys[i], self.on_error, self.min_size)
        if isinstance(img, Unreadable):
            return img
        image, hw = self.decode(img)
        return image, hw, int(self.labels[i]), i, epoch, position


@dataclass
class Batch:
    """One batch, views made (``views``) or to be made on the device (``images`` + ``params``)."""
    geometry: torch.Tensor  # (V, B, 5) crop records in original pixels
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) dataset positions
    skipped: int  # unreadable images dropped from this batch
    views: Optional[list[torch.Tensor]] = None  # V tensors (B, 3, s_v, s_v), global views first
    images: Optional[torch.Tensor] = None  # (B, 3, S, S) uint8
    params: Optional[ViewParams] = None  # host tensors
    unreadable: tuple = ()  # the dropped files (Unreadable): the trainer names them in train.log

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with pin_memory=True: page-locked tensors make the copy
        to the GPU asynchronous (a pageable one waits for the device)."""
        return Batch(self.geometry.pin_memory(), self.labels.pin_memory(), self.indices, self.skipped,
                     None if self.views is None else [v.pin_memory() for v in self.views],
                     None if self.images is None else self.images.pin_memory(), self.params,
                     self.unreadable)

    def __reduce__(self):
        # From a loader worker every tensor crosses in its own shared-memory segment, and each
        # costs a file-descriptor round trip (~0.5 ms): a batch's 13 small tensors took longer
        # than decoding it. Packed, one segment per dtype crosses.
        tensors = [self.geometry, self.labels, self.indices, *(self.views or []),
                   *([] if self.images is None else [self.images]),
                   *([] if self.params is None else [getattr(self.params, f.name) for f in fields(ViewParams)])]
        layout = (None if self.views is None else len(self.views), self.images is not None,
                  self.params is not None, self.skipped, self.unreadable)
        return _unpack_batch, (layout, *pack_by_dtype(tensors))


def pack_by_dtype(tensors: list[torch.Tensor]) -> tuple[list[tuple], dict[torch.dtype, torch.Tensor]]:
    """-> ((dtype, shape) of each tensor, one flat tensor per dtype)."""
    spec = [(t.dtype, tuple(t.shape)) for t in tensors]
    flat = {dtype: torch.cat([t.reshape(-1) for t in tensors if t.dtype == dtype])
            for dtype in dict.fromkeys(t.dtype for t in tensors)}
    return spec, flat


def unpack_by_dtype(spec: list[tuple], flat: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
    offsets = dict.fromkeys(flat, 0)
    out = []
    for dtype, shape in spec:
        n = math.prod(shape)
        out.append(flat[dtype][offsets[dtype]:offsets[dtype] + n].view(shape))
        offsets[dtype] += n
    return out


def _unpack_batch(layout: tuple, spec: list[tuple], flat: dict) -> Batch:
    n_views, has_images, has_params, skipped, unreadable = layout
    rest = unpack_by_dtype(spec, flat)
    geometry_, labels, indices = rest[:3]
    rest = rest[3:]
    views, rest = (None, rest) if n_views is None else (rest[:n_views], rest[n_views:])
    images, rest = (rest[0], rest[1:]) if has_images else (None, rest)
    params = ViewParams(*rest) if has_params else None
    return Batch(geometry_, labels, indices, skipped, views, images, params, unreadable)


class ViewCollate:
    """Collate of the training loader: stack, draw the views' parameters (per sample), and
    make the views here (``make_views``) or leave that to the training device."""

    def __init__(self, cfg: CropConfig, seed: int, make_views: bool):
        self.cfg, self.seed = cfg, seed
        self.maker = ViewMaker(cfg) if make_views else None

    def __call__(self, items: list) -> Batch:
        good = [it for it in items if not isinstance(it, Unreadable)]
        bad = tuple(it for it in items if isinstance(it, Unreadable))
        if not good:
            return Batch(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), len(items),
                         unreadable=bad)
        images = torch.stack([it[0] for it in good])
        hw = torch.stack([it[1] for it in good])
        seeds = [training_seed(self.seed, epoch, position, index) for _, _, _, index, epoch, position in good]
        params = draw_view_params(self.cfg, seeds, hw)
        batch = Batch(geometry(params, hw), torch.tensor([it[2] for it in good]),
                      torch.tensor([it[3] for it in good]), len(bad), unreadable=bad)
        if self.maker is not None:
            batch.views = self.maker(images, params)
        else:
            batch.images, batch.params = images, params
        return batch
