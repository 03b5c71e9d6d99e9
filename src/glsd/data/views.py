"""The one implementation of DINO's multi-crop views: drawn parameters -> views, batched.

``ViewMaker(cfg)(images, params)`` turns a batch of equally sized images ``(B, 3, S, S)``
(uint8, as the loader decodes them) and the parameters drawn by
:mod:`glsd.data.view_params` into V views ``(B, 3, s, s)``, normalised. It runs wherever the
images are: in the loader workers (``data.augment_on=cpu``) or on the training device
(``device``); the parameters come from the host either way, so both places make the same views.

Operations, in DINO's order, each row with its own parameters:

- crop + resize (+ flip): hand-written separable resampling, ``out = Wy @ image @ Wx^T``,
  with PIL's antialiased filters (bicubic a=-0.5, or the triangle for bilinear; the support
  grows with the shrink factor) evaluated at the box's continuous coordinates, clipped and
  renormalised at the image border. That is ``PIL.Image.resize(size, resample, box=...)``;
  torchvision's ``resized_crop`` takes one integer box per call and ``roi_align`` is
  bilinear only, so neither does per-row boxes with ``crops.interpolation``.
- colour jitter (probability ``color_jitter_p``, strengths ``color_jitter``, the four
  operations in each row's own drawn order): hand-written, because
  ``torchvision.transforms.v2.functional.adjust_*`` take one float factor per call; the
  formulas are torchvision's and are tested against it row by row.
- grayscale and solarize: ``torchvision.transforms.v2.functional`` (``rgb_to_grayscale``,
  ``solarize``), which take batches as they are; normalisation is v2's ``normalize``
  arithmetic with mean / std tensors made once per device (v2 builds them from lists on
  every call, a blocking copy on a GPU).
- Gaussian blur: hand-written separable convolution, because v2's ``gaussian_blur`` takes
  one sigma per call; same kernel and reflect padding (tested against it row by row).

Values stay float in [0, 1] between operations. Rows that an operation does not touch are
gathered out by indices computed on the host, so nothing here waits for the device.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from glsd.config import CropConfig
from glsd.data.view_params import ViewParams, blur_sigma_range, seeded_crops, view_sizes


# ----------------------------------------------------------------------------------------
# Crop and resize


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The resampling kernel at distances ``x`` (any shape, in input pixels), elementwise."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5  # PIL's (and torchvision's antialiased) bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, n_in: int,
                     interpolation: str) -> torch.Tensor:
    """``(N, size, n_in)``: output pixel i of row n averages input pixels j with these weights.

    ``start``, ``length`` ``(N,)``: the box along this axis in input pixels (continuous).
    Output pixel i is centred at ``start + (i + 0.5) * length / size``, as in PIL and in
    :func:`glsd.data.geometry.cell_centers`.
    """
    scale = length / size  # (N,) input pixels per output pixel
    stretch = scale.clamp(min=1.0)[:, None, None]  # antialias: widen the filter when shrinking
    i = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5
    j = torch.arange(n_in, device=start.device, dtype=start.dtype) + 0.5
    center = start[:, None] + i[None] * scale[:, None]  # (N, size)
    w = _filter((j[None, None] - center[..., None]) / stretch, interpolation)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                interpolation: str) -> torch.Tensor:
    """Cut normalised ``boxes`` ``(N, 4)`` out of ``images`` at ``size`` x ``size`` and
    mirror the rows of ``flip`` ``(N,)``; row n is cut from image ``n % B`` (N = k B: k views
    of each image, view-major).

    ``images``: ``(B, C, H, W)`` float in [0, 1]. Returns ``(N, C, size, size)`` in [0, 1].
    """
    batch, c, height, width = images.shape
    boxes = boxes.to(images.dtype)
    if height == width:  # the loader's squares: both axes in one call (half the small ops)
        w = resample_weights(boxes[:, :2].T.reshape(-1) * height, boxes[:, 2:].T.reshape(-1) * height,
                             size, height, interpolation)
        wy, wx = w.chunk(2)
    else:
        wy = resample_weights(boxes[:, 0] * height, boxes[:, 2] * height, size, height, interpolation)
        wx = resample_weights(boxes[:, 1] * width, boxes[:, 3] * width, size, width, interpolation)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)  # a flip reverses the output columns
    # Columns first, one view at a time (no copy of the images per view): (B, C*H, W) @ (B, W, s).
    rows = images.reshape(batch, c * height, width)
    wxt = wx.transpose(1, 2)
    y = torch.cat([torch.bmm(rows, wxt[k:k + batch]) for k in range(0, len(boxes), batch)])
    n = len(boxes)
    y = y.view(n, c, height, size).transpose(1, 2).reshape(n, height, c * size)
    out = torch.bmm(wy, y).view(n, size, c, size).permute(0, 2, 1, 3).contiguous()
    return out.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clips too


# ----------------------------------------------------------------------------------------
# Photometric operations on float images ``(N, 3, H, W)`` in [0, 1], one factor per row ``(N,)``


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio[:, None, None, None]
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f[:, None, None, None]).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, TF.rgb_to_grayscale(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's hue shift (RGB -> HSV, h += f mod 1, -> RGB) in closed form, with fewer
    passes (the CPU path pays for each): with ``v = max``, ``c = max - min`` and the hue in
    sixths ``h6``, channel n of (r, g, b) = (5, 3, 1) is ``v - c clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + h6 + 6 f) mod 6`` (``v s = c``, so the saturation never needs dividing out)."""
    r, g, b = x.split(1, dim=1)
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    cr = maxc - minc
    inv = 1.0 / torch.where(cr == 0, torch.ones_like(cr), cr)  # grays: h6 = 0 below
    h6 = torch.where(maxc == r, (g - b) * inv,
                     torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = h6 + 6.0 * f.to(x.dtype)[:, None, None, None]
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(h6 + n, 6.0)
    return maxc - cr * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ViewParams.factors' columns


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, half: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per row ``(N,)``, kernel ``2 half + 1``, reflect
    padding: per row, ``v2.functional.gaussian_blur(x, [2 half + 1] * 2, sigma)``."""
    n, c, hgt, wid = x.shape
    offs = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offs[None] / sigma.to(x.dtype).clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, hgt, wid)


def blur_half_width(cfg: CropConfig, size: int) -> int:
    """Kernel half-width of a view size: 3 of the largest sigma, inside the view."""
    return max(1, min(int(math.ceil(3.0 * blur_sigma_range(cfg, size)[1])), size - 1))


# ----------------------------------------------------------------------------------------


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero()[:, 0]


class ViewMaker:
    """``(images (B, 3, S, S), params)`` -> V views ``(B, 3, s, s)``, normalised, global first.

    uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1].
    ``params`` (:class:`ViewParams`) may live on the host: every row selection is computed
    there and moved to the images' device in one pinned copy per dtype.
    """

    def __init__(self, cfg: CropConfig):
        self.cfg = cfg
        self.sizes = view_sizes(cfg)
        self._constants: dict = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._constants:
            self._constants[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                                         for v in (self.cfg.mean, self.cfg.std))
        return self._constants[key]

    def _plan(self, p: ViewParams, v0: int, v1: int) -> tuple[dict, dict]:
        """Host-side row indices (rows are view-major: row = (v - v0) * B + b) and the
        per-row values of views ``v0:v1``."""
        q = p.select(slice(v0, v1))
        flat = {k: getattr(q, k).flatten(0, 1) for k in ("flip", "jitter", "gray", "blur", "solarize")}
        order, factors = q.order.flatten(0, 1), q.factors.flatten(0, 1)
        idx = {"gray": _rows(flat["gray"]), "blur": _rows(flat["blur"]), "solarize": _rows(flat["solarize"])}
        counts = {}
        for stage in range(4):  # stage k: rows grouped by the operation they do k-th
            groups = [_rows(flat["jitter"] & (order[:, stage] == op)) for op in range(4)]
            idx[f"stage{stage}"] = torch.cat(groups)
            counts[stage] = [len(g) for g in groups]
        values = {"boxes": q.boxes.flatten(0, 1), "factors": factors, "sigma": q.sigma.flatten(0, 1),
                  "flip": flat["flip"]}
        return {**idx, **values}, counts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, params: ViewParams) -> list[torch.Tensor]:
        c = self.cfg
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        batch = x.shape[0]
        views: list[torch.Tensor] = []
        for v0, v1 in ((0, c.num_global), (c.num_global, c.num_global + c.num_local)):
            if v1 == v0:
                continue
            size = self.sizes[v0]
            plan, counts = self._plan(params, v0, v1)
            plan = _to_device(plan, x.device)
            out = crop_resize(x, plan["boxes"], plan["flip"], size, c.interpolation)
            out = self._photometric(out, plan, counts, size)
            # v2.normalize would build its mean / std from lists each call: on a GPU a
            # blocking copy. Same arithmetic with tensors made once per device.
            mean, std = self._mean_std(x.device)
            out = out.sub_(mean).div_(std)
            views += list(out.view(v1 - v0, batch, *out.shape[1:]).unbind(0))
        return views

    def _photometric(self, x: torch.Tensor, plan: dict, counts: dict, size: int) -> torch.Tensor:
        """``x`` ``(N, 3, S, S)`` in [0, 1] -> the same after colour jitter (its four stages in
        each row's drawn order), grayscale, blur and solarisation, as ``plan`` drew them."""
        for stage in range(4):
            rows = plan[f"stage{stage}"]
            if not rows.numel():
                continue
            y, f = x.index_select(0, rows), plan["factors"].index_select(0, rows)
            start = 0
            for op, n in enumerate(counts[stage]):
                if n:
                    y[start:start + n] = _in_chunks(JITTER[op], y[start:start + n], f[start:start + n, op])
                start += n
            x.index_copy_(0, rows, y)
        if plan["gray"].numel():
            rows = plan["gray"]
            x.index_copy_(0, rows, TF.rgb_to_grayscale(x.index_select(0, rows), num_output_channels=3))
        if plan["blur"].numel():
            rows = plan["blur"]
            blurred = gaussian_blur(x.index_select(0, rows), plan["sigma"].index_select(0, rows),
                                    blur_half_width(self.cfg, size))
            x.index_copy_(0, rows, blurred)
        if plan["solarize"].numel():
            rows = plan["solarize"]
            x.index_copy_(0, rows, TF.solarize(x.index_select(0, rows), self.cfg.solarize_threshold / 255.0))
        return x


def _in_chunks(op, x: torch.Tensor, f: torch.Tensor, budget: int = 2 ** 17) -> torch.Tensor:
    """``op(x, f)`` a few rows at a time on a CPU: the hue shift makes some 20 temporaries of
    the input's size, and past the L2 cache that doubles its time. One call on a GPU."""
    per_row = x[0].numel() if len(x) else 1
    if x.device.type != "cpu" or x.numel() <= 2 * budget:
        return op(x, f)
    rows = max(1, budget // per_row)
    return torch.cat([op(x[i:i + rows], f[i:i + rows]) for i in range(0, len(x), rows)])


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors -> ``device`` in one pinned, asynchronous copy per dtype: a copy from
    pageable memory (or one per tensor) would make the host wait for the device each batch."""
    if device.type == "cpu":
        return tensors
    out = {}
    for dtype in {t.dtype for t in tensors.values()}:
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in names])
        if torch.cuda.is_available():
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        for k, part in zip(names, flat.split([tensors[k].numel() for k in names])):
            out[k] = part.view(tensors[k].shape)
    return out


def crops_of_image(cfg: CropConfig, img, seed: int, which: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views ``which`` (indices into ``cfg``'s views, global first) of one PIL image outside
    training (dense evaluation, pictures): the crops and flips of
    :func:`glsd.data.view_params.seeded_crops`, cut from the image at its own resolution,
    no photometric change. -> ``[(view (3, s, s) in [0, 1], geometry (5,) in original pixels)]``."""
    sizes = view_sizes(cfg)
    if max(which) >= len(sizes):
        raise ValueError(f"view {max(which)} asked of a crop config with {len(sizes)} views")
    image = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)[None]  # (1, 3, H, W)
    hw = torch.tensor([float(img.height), float(img.width)])
    boxes, flips = seeded_crops(cfg, seed, hw.tolist())
    out = []
    for v in which:
        view = crop_resize(image, boxes[v:v + 1], flips[v:v + 1], sizes[v], cfg.interpolation)[0]
        out.append((view, torch.cat([boxes[v] * torch.cat([hw, hw]), flips[v:v + 1].float()])))
    return out
