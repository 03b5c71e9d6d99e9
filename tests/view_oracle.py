"""The parity oracle of the views: the same drawn parameters applied per image, one view at a
time, by PIL (crop + resize) and ``torchvision.transforms.v2.functional`` (everything else).

PIL resamples float images (mode ``F``, one channel at a time) with ``resize(box=...)``:
its antialiased bilinear / bicubic filters at the box's continuous coordinates, in double
precision, without the rounding to uint8 that would blur the comparison.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from glsd.config import CropConfig
from glsd.data.view_params import ViewParams, view_sizes
from glsd.data.views import blur_half_width

PIL_FILTER = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
V2_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def pil_crop_resize(image: torch.Tensor, box, flip: bool, size: int, interpolation: str) -> torch.Tensor:
    """``image`` ``(3, H, W)`` float in [0, 1], ``box`` normalised (top, left, h, w)."""
    _, height, width = image.shape
    top, left, h, w = (float(b) for b in box)
    pil_box = (left * width, top * height, (left + w) * width, (top + h) * height)
    channels = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F")
                           .resize((size, size), PIL_FILTER[interpolation], box=pil_box))
                for c in image]
    out = torch.from_numpy(np.stack(channels)).clamp(0, 1)
    return out.flip(-1) if flip else out


def one_view(image: torch.Tensor, p: ViewParams, v: int, b: int, cfg: CropConfig) -> torch.Tensor:
    """View v of image b (``image`` ``(3, H, W)`` float in [0, 1]), normalised."""
    size = view_sizes(cfg)[v]
    x = pil_crop_resize(image, p.boxes[v, b], bool(p.flip[v, b]), size, cfg.interpolation)
    if p.jitter[v, b]:
        for op in p.order[v, b].tolist():
            x = V2_JITTER[op](x, float(p.factors[v, b, op]))
    if p.gray[v, b]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[v, b]:
        k = 2 * blur_half_width(cfg, size) + 1
        x = TF.gaussian_blur(x, [k, k], [float(p.sigma[v, b])] * 2)
    if p.solarize[v, b]:
        x = TF.solarize(x, cfg.solarize_threshold / 255.0)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


def oracle_views(images: torch.Tensor, p: ViewParams, cfg: CropConfig) -> list[torch.Tensor]:
    """``images`` ``(B, 3, S, S)`` uint8 -> V views ``(B, 3, s, s)``, one image at a time."""
    x = images.float() / 255.0
    n_views, batch = p.flip.shape
    return [torch.stack([one_view(x[b], p, v, b, cfg) for b in range(batch)]) for v in range(n_views)]
