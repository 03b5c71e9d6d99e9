"""Batched multi-crop augmentation: on the training device (``data.augment_on=device``) or
in the loader workers on the CPU (``data.augment_on=cpu_batched``).

The CPU pipeline (:mod:`glsd.data.multicrop`) makes every view of every image in PIL, one at
a time, in loader workers. Here the loader only decodes and resizes each image to one fixed
square (uint8, :func:`device_input_size`), and the whole batch becomes all its views on the
device in a few batched calls:

- random resized crop: the crop boxes of all images are drawn at once (torchvision's
  ``RandomResizedCrop.get_params`` rule: 10 tries of area and log-ratio, then the central
  fallback) and cut with ``torchvision.ops.roi_align`` (``aligned=True``, adaptive sampling):
  output pixel ``j`` is the average of bilinear samples over its bin, whose centre lies at
  ``left + (j + 0.5) * width / size``; shrinking crops are area-averaged (no aliasing);
- horizontal flip, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1),
  grayscale, Gaussian blur (radius range stated for 224 px, scaled with the crop size), and
  solarize (second global view), each with per-image random factors and probabilities as in
  :class:`glsd.config.CropConfig`; then normalisation.

Geometry records ``(V, B, 5)`` have exactly the format of :mod:`glsd.data.geometry`
(top, left, height, width, flipped), in original-image pixels: boxes drawn on the resized
square are scaled back by the original size of each image, so cell centres agree with the
CPU path's convention.

Differences from the CPU path, by design: interpolation is bilinear with area averaging
(not bicubic); values stay float between operations (PIL rounds to uint8 after each); the
order of the four colour-jitter operations is drawn once per call for all images of one view
size (torchvision draws it per image); the crop is drawn on the resized square, so the
aspect-ratio range applies to the resized image.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import roi_align

from glsd.config import Config, CropConfig
from glsd.data.geometry import FLIP, HEIGHT, LEFT, TOP, WIDTH
from glsd.data.loader import ResumableSampler, build_loader
from glsd.data.multicrop import Batch
from glsd.data.sources import ImageSource

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL and torchvision


def device_input_size(crops: CropConfig) -> int:
    """Side of the square every image is resized to before device augmentation.

    Small-image recipes (global crops up to 64 px, e.g. CIFAR at 32) keep the images at
    the global crop size; larger ones use ``8/7`` of it rounded up to a multiple of 8
    (256 for 224 px crops, the usual ImageNet resize).
    """
    g = crops.global_size
    if g <= 64:
        return g
    return 8 * math.ceil(g * 8 / 7 / 8)


# ----------------------------------------------------------------------------------------
# Loader side: decode + resize to uint8


class ResizeToUint8:
    """Loader transform: PIL image -> (uint8 ``(3, S, S)``, original ``(h, w)``).

    Takes ``index`` and ``epoch`` like :class:`glsd.data.loader.SeededMultiCrop`; nothing
    here is random, all randomness is drawn on the device.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, index: int = 0, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = img.size
        if (h, w) != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return image, torch.tensor([h, w], dtype=torch.float32)


@dataclass
class RawBatch:
    """A batch for device augmentation: uint8 images and their original sizes."""
    images: torch.Tensor  # (B, 3, S, S) uint8
    orig_hw: torch.Tensor  # (B, 2) original height, width
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,)
    skipped: int

    def to(self, device, non_blocking: bool = False) -> "RawBatch":
        return RawBatch(self.images.to(device, non_blocking=non_blocking),
                        self.orig_hw.to(device, non_blocking=non_blocking),
                        self.labels.to(device, non_blocking=non_blocking), self.indices, self.skipped)

    def pin_memory(self) -> "RawBatch":
        """Called by a DataLoader with pin_memory=True (asynchronous copies to the GPU)."""
        return RawBatch(self.images.pin_memory(), self.orig_hw.pin_memory(),
                        self.labels.pin_memory(), self.indices, self.skipped)


def collate_uint8(items: list) -> RawBatch:
    good = [it for it in items if it is not None]
    if not good:
        return RawBatch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, 2),
                        torch.empty(0), torch.empty(0), len(items))
    return RawBatch(torch.stack([it[0] for it in good]), torch.stack([it[1] for it in good]),
                    torch.tensor([it[2] for it in good]), torch.tensor([it[3] for it in good]),
                    len(items) - len(good))


def build_device_loader(cfg: Config, subset: ImageSource, rank: int, world_size: int,
                        pin_memory: bool) -> tuple[DataLoader, ResumableSampler, ResizeToUint8]:
    """The loader of ``data.augment_on=device``: same sampler (order, resume) as
    :func:`glsd.data.loader.build_loader`, batches of :class:`RawBatch`."""
    return build_loader(cfg, subset, rank, world_size, pin_memory,
                        transform=ResizeToUint8(device_input_size(cfg.crops)), collate_fn=collate_uint8)


class BatchedAugmentCollate:
    """The collate function of ``data.augment_on=cpu_batched``: uint8 images -> a
    :class:`glsd.data.multicrop.Batch` of all views, made in the loader worker by
    :class:`DeviceMultiCrop` on the CPU (one batched pass instead of one PIL call per view).

    The random stream is seeded by (train seed, rank, epoch, the batch's dataset indices in
    order): what the sampler hands out, so a resumed run and any worker count draw the same
    views. Unlike ``augment_on=cpu`` (seeded per image), the views depend on how the images
    are batched: another batch size or world size draws others.
    """

    def __init__(self, cfg: Config, rank: int = 0):
        self.multicrop = DeviceMultiCrop(cfg.crops)
        self.seed, self.rank = cfg.train.seed, rank

    def __call__(self, items: list) -> Batch:
        raw = collate_uint8(items)
        if len(raw.indices) == 0:
            return Batch([], torch.empty(0), torch.empty(0), torch.empty(0), raw.skipped)
        epoch = next(it[4] for it in items if it is not None)
        digest = hashlib.blake2b(raw.indices.numpy().astype(np.int64).tobytes(), digest_size=8,
                                 key=f"{self.seed}/{self.rank}/{epoch}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2 ** 63))
        views, geometry = self.multicrop(raw.images, raw.orig_hw, gen, gen)
        return Batch(views, geometry, raw.labels, raw.indices, raw.skipped)


def build_batched_cpu_loader(cfg: Config, subset: ImageSource, rank: int, world_size: int,
                             pin_memory: bool) -> tuple[DataLoader, ResumableSampler, ResizeToUint8]:
    """The loader of ``data.augment_on=cpu_batched``: batches of views and geometry, as the
    default loader delivers them, same sampler (order, resume)."""
    return build_loader(cfg, subset, rank, world_size, pin_memory,
                        transform=ResizeToUint8(device_input_size(cfg.crops)),
                        collate_fn=BatchedAugmentCollate(cfg, rank))


# ----------------------------------------------------------------------------------------
# Device side: crops


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_crops(batch: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], generator: Optional[torch.Generator] = None,
                 device=None, attempts: int = 10) -> torch.Tensor:
    """``(batch, 4)`` integer crop boxes (top, left, height, width), float, drawn like
    ``torchvision.transforms.RandomResizedCrop.get_params`` for an image of this size."""
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = _rand((4, batch, attempts), generator, device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # first valid attempt
    any_ok = ok.any(dim=1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    # Fallback (no valid attempt): the central crop of the clamped ratio, as torchvision.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    top = torch.floor(u[2, :, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[3, :, 0] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(any_ok, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(any_ok, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, sample: torch.Tensor, size: int,
                flipped: torch.Tensor) -> torch.Tensor:
    """Cut ``boxes`` ``(N, 4)`` (top, left, h, w) out of ``images[sample]`` at ``size``
    (area-averaged bilinear), then flip the rows of ``flipped`` ``(N,)``. -> ``(N, C, s, s)``."""
    top, left, h, w = boxes.unbind(1)
    rois = torch.stack([sample.to(images.dtype), left, top, left + w, top + h], dim=1)
    out = roi_align(images, rois.to(images.dtype), (size, size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    return torch.where(flipped[:, None, None, None], out.flip(-1), out)


# ----------------------------------------------------------------------------------------
# Device side: photometric operations on float images in [0, 1], per-row factors


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio[:, None, None, None]
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(x, f):
    return (x * f[:, None, None, None]).clamp_(0.0, 1.0)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, 3, H, W)`` RGB in [0, 1] -> hue in [0, 1), saturation, value, each ``(N, 1, H, W)``
    (torchvision's conversion, written with fewer passes)."""
    r, g, b = x.split(1, dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    cr = maxc - minc
    s = cr / maxc.clamp(min=1e-12)  # 0 where max == min (black and grays included)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    h = torch.where(maxc == r, (g - b) / crd,
                    torch.where(maxc == g, 2.0 + (b - r) / crd, 4.0 + (r - g) / crd))
    h = torch.remainder(h / 6.0, 1.0)
    return h, s, maxc


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
               channel_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n of (r, g, b) = (5, 3, 1) is
    ``v - v * s * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``."""
    n = channel_offsets  # (1, 3, 1, 1): 5, 3, 1
    if n is None:
        n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x, f, channel_offsets: Optional[torch.Tensor] = None):
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb(torch.remainder(h + f[:, None, None, None], 1.0), s, v, channel_offsets)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: Optional[float] = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per row ``(N,)``, reflect padding. The kernel
    spans 3 ``max_sigma`` (default: the largest sigma, which costs a device sync)."""
    n, c, hgt, wid = x.shape
    if max_sigma is None:
        max_sigma = float(sigma.max())
    half = int(math.ceil(3.0 * max_sigma))
    half = max(1, min(half, hgt - 1, wid - 1))
    offs = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offs[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, hgt, wid)


# ----------------------------------------------------------------------------------------


class DeviceMultiCrop:
    """A batch of images ``(B, 3, H, W)`` on any device -> (V views ``(B, 3, s, s)``, geometry
    ``(V, B, 5)``), global views first, as :class:`glsd.data.multicrop.MultiCrop` per image.

    uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1].
    ``orig_hw`` ``(B, 2)``: the size each image had before it was resized to ``H x W``;
    geometry is then in original pixels (None: in pixels of the given images).
    """

    def __init__(self, cfg: CropConfig):
        self.cfg = cfg
        self._constants: dict = {}

    def constants(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-view probabilities and normalisation made once per device: a tensor built from
        a Python list on a GPU is a blocking copy, and a step would wait for the device."""
        key = (str(device), dtype)
        if key not in self._constants:
            c = self.cfg
            blur_g1, blur_g2, blur_l = c.blur_p
            self._constants[key] = {k: v.to(device) for k, v in {
                "blur_p_global": torch.tensor([blur_g1 if v == 0 else blur_g2 for v in range(c.num_global)]),
                "solar_p_global": torch.tensor([c.solarize_p if v == 1 else 0.0 for v in range(c.num_global)]),
                "blur_p_local": torch.full((c.num_local,), float(blur_l)),
                "solar_p_local": torch.zeros(c.num_local),
                "mean": torch.tensor(c.mean, dtype=dtype)[None, :, None, None],
                "std": torch.tensor(c.std, dtype=dtype)[None, :, None, None],
                "hsv_n": torch.tensor([5.0, 3.0, 1.0], dtype=dtype).view(1, 3, 1, 1),
            }.items()}
        return self._constants[key]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, orig_hw: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None,
                 host_generator: Optional[torch.Generator] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``host_generator`` (a CPU generator) draws the colour-jitter order; without it the
        order comes from ``generator``, which on a GPU costs a device sync per view group."""
        c = self.cfg
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        batch, _, height, width = x.shape
        dev = x.device
        views: list[torch.Tensor] = []
        geoms: list[torch.Tensor] = []
        consts = self.constants(dev, x.dtype)
        groups = [(c.num_global, c.global_size, c.global_scale, consts["blur_p_global"], consts["solar_p_global"]),
                  (c.num_local, c.local_size, c.local_scale, consts["blur_p_local"], consts["solar_p_local"])]
        for n_views, size, scale, blur_p, solar_p in groups:
            if n_views == 0:
                continue
            n = n_views * batch
            boxes = sample_crops(n, height, width, scale, c.ratio, generator, dev)  # (n, 4)
            flipped = _rand((n,), generator, dev) < c.flip_p
            sample = torch.arange(batch, device=dev).repeat(n_views)  # row r: image r % B
            out = crop_resize(x, boxes, sample, size, flipped)
            out = self._photometric(out, size, n_views, batch, blur_p, solar_p, generator,
                                    host_generator)
            views += list(out.view(n_views, batch, *out.shape[1:]).unbind(0))
            geom = torch.cat([boxes, flipped[:, None].float()], dim=1)  # (n, 5)
            geoms.append(geom.view(n_views, batch, 5))
        geometry = torch.cat(geoms)
        if orig_hw is not None:
            sy = orig_hw[:, 0].to(dev, torch.float32) / height
            sx = orig_hw[:, 1].to(dev, torch.float32) / width
            geometry = geometry.clone()
            geometry[..., TOP] *= sy
            geometry[..., HEIGHT] *= sy
            geometry[..., LEFT] *= sx
            geometry[..., WIDTH] *= sx
        assert geometry.shape[-1] == FLIP + 1
        return views, geometry

    def _photometric(self, x: torch.Tensor, size: int, n_views: int, batch: int,
                     blur_p: torch.Tensor, solar_p: torch.Tensor, generator,
                     host_generator: Optional[torch.Generator]) -> torch.Tensor:
        """``blur_p``, ``solar_p``: ``(n_views,)`` probabilities; rows are view-major."""
        c, dev, n = self.cfg, x.device, x.shape[0]
        consts = self.constants(dev, x.dtype)
        # Colour jitter (p = color_jitter_p): per-row factors, identity where not applied.
        jitter = _rand((n,), generator, dev) < c.color_jitter_p
        u = _rand((4, n), generator, dev)
        one = torch.ones(n, device=dev)
        factors = {
            "brightness": torch.where(jitter, 0.6 + 0.8 * u[0], one),
            "contrast": torch.where(jitter, 0.6 + 0.8 * u[1], one),
            "saturation": torch.where(jitter, 0.8 + 0.4 * u[2], one),
            "hue": torch.where(jitter, -0.1 + 0.2 * u[3], one * 0.0),
        }
        ops = {"brightness": adjust_brightness, "contrast": adjust_contrast,
               "saturation": adjust_saturation,
               "hue": lambda y, f: adjust_hue(y, f, consts["hsv_n"])}
        # All rows go through the four operations (no data-dependent shapes, no sync);
        # rows without jitter keep their input exactly.
        if host_generator is not None:
            order = torch.randperm(4, generator=host_generator).tolist()
        else:
            order = torch.randperm(4, generator=generator, device=dev).tolist()
        y = x
        for k in order:
            name = list(ops)[k]
            y = ops[name](y, factors[name])
        x = torch.where(jitter[:, None, None, None], y, x)
        gray = _rand((n,), generator, dev) < c.grayscale_p
        x = torch.where(gray[:, None, None, None], _gray(x).expand_as(x), x)
        # Blur: per-view probability, sigma from the 224 px radius range scaled to the size.
        p_blur = blur_p[:, None].expand(n_views, batch).reshape(-1)
        lo, hi = (r * size / 224.0 for r in c.blur_radius)
        blur = _rand((n,), generator, dev) < p_blur
        sigma = lo + (hi - lo) * _rand((n,), generator, dev)
        if dev.type == "cpu":  # blur only the rows that draw it: CPU time is the cost here
            rows = blur.nonzero()[:, 0]
            if rows.numel():
                x = x.index_copy(0, rows, gaussian_blur(x[rows], sigma[rows], hi))
        else:  # blur every row and select: a data-dependent row count would sync the device
            x = torch.where(blur[:, None, None, None], gaussian_blur(x, sigma, hi), x)
        p_sol = solar_p[:, None].expand(n_views, batch).reshape(-1)
        solar = _rand((n,), generator, dev) < p_sol
        x = torch.where(solar[:, None, None, None] & (x >= 128.0 / 255.0), 1.0 - x, x)
        return (x - consts["mean"]) / consts["std"]


class StepAugment:
    """Makes a training step's views from a :class:`RawBatch` on the device, seeded by
    (seed, rank, step) so a resumed run draws the same augmentations."""

    def __init__(self, cfg: Config, rank: int = 0):
        self.multicrop = DeviceMultiCrop(cfg.crops)
        self.seed = (cfg.train.seed * 1_000_003 + rank) * 10_000_019

    def __call__(self, batch: RawBatch, device: torch.device, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = batch.images.to(device, non_blocking=True)
        orig_hw = batch.orig_hw.to(device, non_blocking=True)
        seed = (self.seed + step) % (2 ** 63)
        gen = torch.Generator(device=device).manual_seed(seed)
        host_gen = gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
        return self.multicrop(images, orig_hw, gen, host_gen)
