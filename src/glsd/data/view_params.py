"""The one seeding rule and the one home of seeded view drawing.

Every random choice of a view (crop box, flip, colour-jitter factors and order, grayscale,
blur sigma, solarize) is drawn here, on the host, from one generator per sample seeded by
:func:`sample_seed` of (stream, seed, epoch, position in the epoch, dataset index). Nothing
depends on the batch the sample sits in, the world size, the worker count or the device the
views are made on: :mod:`glsd.data.views` applies the drawn parameters, in the loader workers
or on the training device, with the same code. The training loader, ``eval/dense.py`` and the
pictures (``viz``) all draw their crops through this module.

Crop boxes are normalised: ``(top, left, height, width)`` as fractions of the image, drawn
by torchvision's ``RandomResizedCrop.get_params`` rule (10 tries of area fraction and
log-ratio against the image's own aspect ratio, then the central crop of the clamped ratio)
without its rounding to whole pixels, so a box means the same region at any resolution.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from glsd.config import CropConfig

ATTEMPTS = 10  # RandomResizedCrop's tries before the central fallback
# Columns of the per-view uniform draws: (start, stop) in a row of N_UNIFORMS.
AREA, LOG_RATIO = (0, ATTEMPTS), (ATTEMPTS, 2 * ATTEMPTS)
TOP_U, LEFT_U, FLIP_U, JITTER_U = 20, 21, 22, 23
FACTOR_U, ORDER_U = (24, 28), (28, 32)
GRAY_U, BLUR_U, SIGMA_U, SOLAR_U = 32, 33, 34, 35
N_UNIFORMS = 36


def sample_seed(*keys) -> int:
    """A 63-bit seed from any ints and strings (a hash: nearby keys give unrelated streams)."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def training_seed(seed: int, epoch: int, position: int, index: int) -> int:
    """The seed of one training sample's views: (train seed, epoch, position, dataset index)."""
    return sample_seed("views", seed, epoch, position, index)


@dataclass
class ViewParams:
    """Drawn parameters of V views of B images (host tensors), global views first."""
    boxes: torch.Tensor  # (V, B, 4) normalised top, left, height, width
    flip: torch.Tensor  # (V, B) bool
    jitter: torch.Tensor  # (V, B) bool: colour jitter applied
    factors: torch.Tensor  # (V, B, 4) brightness, contrast, saturation, hue (identity if not jittered)
    order: torch.Tensor  # (V, B, 4) int64: the order of the four jitter operations
    gray: torch.Tensor  # (V, B) bool
    blur: torch.Tensor  # (V, B) bool
    sigma: torch.Tensor  # (V, B) blur sigma in output pixels
    solarize: torch.Tensor  # (V, B) bool

    def select(self, views: slice) -> "ViewParams":
        return ViewParams(*(getattr(self, f.name)[views] for f in fields(self)))


def view_sizes(cfg: CropConfig) -> list[int]:
    return [cfg.global_size] * cfg.num_global + [cfg.local_size] * cfg.num_local


def blur_sigma_range(cfg: CropConfig, size: int) -> tuple[float, float]:
    """DINO's radius range, as given (``blur_radius_reference: null``) or scaled by
    ``size / blur_radius_reference`` (a 2 px radius would wipe out a 32 px crop)."""
    lo, hi = cfg.blur_radius
    if cfg.blur_radius_reference is None:
        return float(lo), float(hi)
    k = size / cfg.blur_radius_reference
    return lo * k, hi * k


def _per_view_probabilities(cfg: CropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(V,) blur and solarize probabilities: DINO blurs the first global view always (1.0),
    the other globals rarely (0.1), locals half the time; only the second global view may be
    solarised."""
    g1, g2, loc = cfg.blur_p
    blur = [g1 if v == 0 else g2 for v in range(cfg.num_global)] + [loc] * cfg.num_local
    solar = [cfg.solarize_p if v == 1 else 0.0 for v in range(cfg.num_global)] + [0.0] * cfg.num_local
    return torch.tensor(blur, dtype=torch.float64), torch.tensor(solar, dtype=torch.float64)


def crop_boxes(u: torch.Tensor, hw: torch.Tensor, scale: Sequence[float],
               ratio: Sequence[float]) -> torch.Tensor:
    """RandomResizedCrop's rule in normalised form.

    Args:
        u: ``(..., N_UNIFORMS)`` uniforms (the AREA, LOG_RATIO, TOP_U, LEFT_U columns are read).
        hw: ``(..., 2)`` the image's height and width (only their ratio matters).
    Returns:
        ``(..., 4)`` top, left, height, width as fractions of the image.
    """
    u, hw = u.double(), hw.double()
    aspect = (hw[..., 1] / hw[..., 0])[..., None]  # (..., 1) image width / height
    area = scale[0] + (scale[1] - scale[0]) * u[..., AREA[0]:AREA[1]]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., LOG_RATIO[0]:LOG_RATIO[1]]
    r = torch.exp(log_r)  # crop width / height in pixels
    # w_px = sqrt(area * H * W * r): as a fraction of W, sqrt(area * r / aspect); h likewise.
    wn, hn = torch.sqrt(area * r / aspect), torch.sqrt(area / r * aspect)
    ok = (wn <= 1.0) & (hn <= 1.0)
    first = torch.argmax(ok.to(torch.uint8), dim=-1, keepdim=True)  # the first valid try
    any_ok = ok.any(-1)
    wn, hn = wn.gather(-1, first)[..., 0], hn.gather(-1, first)[..., 0]
    # Fallback: the whole image, narrowed to the nearest allowed ratio (central).
    a = aspect[..., 0]
    fw = torch.where(a > max(ratio), max(ratio) / a, torch.ones_like(a))
    fh = torch.where(a < min(ratio), a / min(ratio), torch.ones_like(a))
    wn, hn = torch.where(any_ok, wn, fw), torch.where(any_ok, hn, fh)
    top = torch.where(any_ok, u[..., TOP_U] * (1 - hn), (1 - hn) / 2)
    left = torch.where(any_ok, u[..., LEFT_U] * (1 - wn), (1 - wn) / 2)
    return torch.stack([top, left, hn, wn], dim=-1).float()


def draw_view_params(cfg: CropConfig, seeds: Sequence[int], hw: torch.Tensor) -> ViewParams:
    """The parameters of all views of B samples.

    Args:
        seeds: B per-sample seeds (:func:`training_seed`, or another stream's).
        hw: ``(B, 2)`` each image's original height and width.
    """
    n_views = cfg.num_global + cfg.num_local
    u = torch.stack([torch.rand(n_views, N_UNIFORMS, generator=torch.Generator().manual_seed(s),
                                dtype=torch.float64) for s in seeds], dim=1)  # (V, B, K)
    batch = len(seeds)
    g = slice(0, cfg.num_global)
    loc = slice(cfg.num_global, n_views)
    boxes = torch.cat([crop_boxes(u[g], hw.expand(cfg.num_global, batch, 2), cfg.global_scale, cfg.ratio),
                       crop_boxes(u[loc], hw.expand(cfg.num_local, batch, 2), cfg.local_scale, cfg.ratio)])
    jitter = u[..., JITTER_U] < cfg.color_jitter_p
    b, c, s, h = cfg.color_jitter
    fu = 2 * u[..., FACTOR_U[0]:FACTOR_U[1]] - 1  # (V, B, 4) in [-1, 1)
    factors = torch.stack([(1 + b * fu[..., 0]).clamp(min=0), (1 + c * fu[..., 1]).clamp(min=0),
                           (1 + s * fu[..., 2]).clamp(min=0), h * fu[..., 3]], dim=-1)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=factors.dtype)
    factors = torch.where(jitter[..., None], factors, identity)
    order = torch.argsort(u[..., ORDER_U[0]:ORDER_U[1]], dim=-1)  # a uniform permutation
    blur_p, solar_p = _per_view_probabilities(cfg)
    sizes = view_sizes(cfg)
    lo, hi = (torch.tensor([blur_sigma_range(cfg, sz)[i] for sz in sizes], dtype=torch.float64)[:, None]
              for i in (0, 1))
    return ViewParams(
        boxes=boxes, flip=u[..., FLIP_U] < cfg.flip_p, jitter=jitter, factors=factors.float(),
        order=order, gray=u[..., GRAY_U] < cfg.grayscale_p, blur=u[..., BLUR_U] < blur_p[:, None],
        sigma=(lo + (hi - lo) * u[..., SIGMA_U]).float(), solarize=u[..., SOLAR_U] < solar_p[:, None])


def geometry(params: ViewParams, hw: torch.Tensor) -> torch.Tensor:
    """``(V, B, 5)`` crop records of :mod:`glsd.data.geometry` (top, left, height, width in
    original-image pixels, flipped) from normalised boxes and ``hw`` ``(B, 2)``."""
    scale = torch.cat([hw, hw], dim=-1).float()  # (B, 4): H, W, H, W
    return torch.cat([params.boxes * scale, params.flip[..., None].float()], dim=-1)


def seeded_crops(cfg: CropConfig, seed: int, hw: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of one image outside training (dense evaluation, pictures): the boxes and flips
    of all ``cfg`` views of an image of size ``hw``, drawn from ``seed``.

    Returns ``(V, 4)`` normalised boxes and ``(V,)`` flips, global views first.
    """
    params = draw_view_params(cfg, [seed], torch.tensor([list(hw)], dtype=torch.float32))
    return params.boxes[:, 0], params.flip[:, 0]
