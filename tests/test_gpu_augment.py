"""Batched device augmentation (data.augment_on=device), checked on the CPU.

The geometry test is exact: views of an image whose pixels hold their own coordinates must
show, pixel by pixel, the coordinates that the geometry records predict (cell_centers with
one cell per output pixel).
"""
import math

import pytest
import torch

from glsd.config import CropConfig, load_config
from glsd.data.geometry import cell_centers
from glsd.data.gpu_augment import (BatchedAugmentCollate, DeviceMultiCrop, RawBatch, ResizeToUint8, StepAugment,
                                   build_batched_cpu_loader,
                                   adjust_hue, build_device_loader, device_input_size,
                                   gaussian_blur, sample_crops)
from glsd.data.sources import synthetic_source

from helpers_tiny import read_metrics, tiny_config

NO_PHOTOMETRIC = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def coordinate_image(batch: int, height: int, width: int, y_scale: float = 1.0, x_scale: float = 1.0):
    """(B, 3, H, W) float: channel 0 = y, channel 1 = x of each pixel centre (times a scale)."""
    yy, xx = torch.meshgrid((torch.arange(height).float() + 0.5) * y_scale,
                            (torch.arange(width).float() + 0.5) * x_scale, indexing="ij")
    return torch.stack([yy, xx, torch.zeros_like(yy)])[None].repeat(batch, 1, 1, 1)


def check_views_show_geometry(views, geometry, image_hw, interior_tol=1e-3, border_tol=0.25):
    """Each view pixel holds the original coordinates its geometry predicts: exactly where
    its sampling bin stays half a pixel inside the image; within ``border_tol`` at the image
    border (bilinear sampling clamps there, like any resize)."""
    height, width = image_hw
    for v, view in enumerate(views):
        size = view.shape[-1]
        want = cell_centers(geometry[v], (size, size)).view(-1, size, size, 2)
        got = view[:, :2].permute(0, 2, 3, 1)
        err = (got - want).abs()
        half_bin = torch.stack([geometry[v, :, 2], geometry[v, :, 3]], -1)[:, None, None] / size / 2
        inside = ((want - half_bin >= 0.5) & (want + half_bin <= torch.tensor([height, width]) - 0.5))
        assert err[inside].max() < interior_tol, f"view {v}: interior error {err[inside].max()}"
        assert err.max() < border_tol, f"view {v}: border error {err.max()}"
        assert inside.float().mean() > 0.5


@pytest.mark.parametrize("flip_p", [0.0, 1.0, 0.5])
def test_views_show_the_coordinates_the_geometry_predicts(flip_p):
    cfg = CropConfig(num_global=2, num_local=4, global_size=32, local_size=16, flip_p=flip_p,
                     **NO_PHOTOMETRIC)
    images = coordinate_image(6, 48, 64)  # non-square
    views, geometry = DeviceMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 4
    assert geometry.shape == (6, 6, 5)
    if flip_p in (0.0, 1.0):
        assert torch.all(geometry[..., 4] == flip_p)
    check_views_show_geometry(views, geometry, (48, 64))


def test_uint8_path_and_exact_integer_boxes():
    cfg = CropConfig(num_local=3, **NO_PHOTOMETRIC)
    height, width = 40, 56
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images = torch.stack([yy, xx, torch.zeros_like(yy)])[None].repeat(4, 1, 1, 1).to(torch.uint8)
    views, geometry = DeviceMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(0))
    # uint8 -> /255 -> mean 0, std 1: scale back; a pixel's value is its index = centre - 0.5.
    views = [v * 255.0 + 0.5 for v in views]
    check_views_show_geometry(views, geometry, (height, width), interior_tol=1e-3)
    boxes = geometry[..., :4]
    assert torch.equal(boxes, boxes.round())
    assert torch.all(boxes[..., 0] >= 0) and torch.all(boxes[..., 0] + boxes[..., 2] <= height)
    assert torch.all(boxes[..., 1] >= 0) and torch.all(boxes[..., 1] + boxes[..., 3] <= width)


def test_geometry_is_in_original_pixels_after_a_resize():
    """Images resized from 375 x 500 to 40 x 40: the records are scaled back, and a resized
    image that holds original coordinates shows the ones the records predict."""
    cfg = CropConfig(num_local=2, global_size=24, local_size=12, **NO_PHOTOMETRIC)
    orig_h, orig_w, s = 375.0, 500.0, 40
    images = coordinate_image(3, s, s, y_scale=orig_h / s, x_scale=orig_w / s)
    orig_hw = torch.tensor([[orig_h, orig_w]] * 3)
    views, geometry = DeviceMultiCrop(cfg)(images, orig_hw, generator=torch.Generator().manual_seed(5))
    assert float(geometry[..., 0].add(geometry[..., 2]).max()) <= orig_h + 1e-3
    assert float(geometry[..., 1].add(geometry[..., 3]).max()) <= orig_w + 1e-3
    for v, view in enumerate(views):
        size = view.shape[-1]
        want = cell_centers(geometry[v], (size, size)).view(-1, size, size, 2)
        got = view[:, :2].permute(0, 2, 3, 1)
        err = (got - want).abs() / torch.tensor([orig_h / s, orig_w / s])  # in resized pixels
        half_bin = torch.stack([geometry[v, :, 2], geometry[v, :, 3]], -1)[:, None, None] / size / 2
        scale = torch.tensor([orig_h / s, orig_w / s])
        inside = ((want - half_bin >= 0.5 * scale) & (want + half_bin <= torch.tensor([orig_h, orig_w]) - 0.5 * scale))
        assert err[inside].max() < 1e-3
        assert err.max() < 0.25


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    boxes = sample_crops(4000, 60, 80, (0.1, 0.5), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert torch.all(top >= 0) and torch.all(left >= 0)
    assert torch.all(top + h <= 60) and torch.all(left + w <= 80)
    area = h * w / (60 * 80)
    # Rounding to whole pixels moves area and ratio a little beyond the drawn ranges.
    assert area.min() > 0.08 and area.max() < 0.53
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.45
    assert 0.2 < area.mean() < 0.4
    # Positions cover the image (uniform over the valid range).
    assert top.min() == 0 and left.min() == 0
    # A range no crop fits: every box is the central fallback.
    fallback = sample_crops(5, 10, 100, (1.0, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    assert torch.all(fallback == torch.tensor([0.0, 43.0, 10.0, 13.0]))


def test_photometric_operations():
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(8, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    base = dict(NO_PHOTOMETRIC, num_local=2)
    # Grayscale always: channels equal.
    views, _ = DeviceMultiCrop(CropConfig(**dict(base, grayscale_p=1.0)))(images, generator=gen)
    for v in views:
        assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 1], v[:, 2])
    # Solarize always: only the second global view is solarised (inverted above 128/255).
    cfg = CropConfig(**dict(base, solarize_p=1.0, flip_p=0.0))
    plain, geo_a = DeviceMultiCrop(CropConfig(**dict(base, flip_p=0.0)))(images, generator=torch.Generator().manual_seed(1))
    solar, geo_b = DeviceMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(geo_a, geo_b)
    assert torch.equal(plain[0], solar[0]) and torch.equal(plain[2], solar[2])
    want = torch.where(plain[1] >= 128 / 255, 1 - plain[1], plain[1])
    assert torch.allclose(solar[1], want)
    # Blur lowers the variance of noise; jitter keeps values in range; everything finite.
    noise = torch.rand(4, 3, 24, 24, generator=gen)
    assert gaussian_blur(noise, torch.full((4,), 1.5)).var() < 0.5 * noise.var()
    assert torch.allclose(gaussian_blur(noise, torch.full((4,), 1e-4)), noise, atol=1e-6)
    full = CropConfig(num_local=3)
    views, geometry = DeviceMultiCrop(full)(images, generator=gen)
    lo = (0 - max(full.mean)) / min(full.std)
    hi = (1 - min(full.mean)) / min(full.std)
    for v in views:
        assert torch.isfinite(v).all() and v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    # Hue: a shift of 1/3 turns red into green.
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert torch.allclose(adjust_hue(red, torch.tensor([1 / 3])), red.roll(1, dims=1), atol=1e-5)


def test_seeded_and_deterministic():
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    aug = DeviceMultiCrop(CropConfig())
    a = aug(images, generator=torch.Generator().manual_seed(7))
    b = aug(images, generator=torch.Generator().manual_seed(7))
    c = aug(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_device_loader_and_step_augment(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.augment_on=device")
    assert device_input_size(cfg.crops) == 32
    assert device_input_size(CropConfig(global_size=224)) == 256
    source = synthetic_source(16, 40, 4)
    loader, sampler, transform = build_device_loader(cfg, source, 0, 1, pin_memory=False)
    batch = next(iter(loader))
    assert isinstance(batch, RawBatch)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 32, 32)
    assert torch.all(batch.orig_hw == torch.tensor([40.0, 40.0]))
    views, geometry = StepAugment(cfg)(batch, torch.device("cpu"), step=3)
    n_views = cfg.crops.num_global + cfg.crops.num_local
    assert len(views) == n_views and geometry.shape == (n_views, 8, 5)
    assert float((geometry[..., 1] + geometry[..., 3]).max()) <= 40 + 1e-4  # original pixels
    again, geometry2 = StepAugment(cfg)(batch, torch.device("cpu"), step=3)
    assert torch.equal(geometry, geometry2)
    # The resize keeps an image of the target size untouched.
    img, hw = ResizeToUint8(40)(source.read("0"))
    assert img.shape == (3, 40, 40) and hw.tolist() == [40.0, 40.0]


def test_pretrain_with_device_augmentation(tmp_path):
    from glsd.train.pretrain import pretrain

    run = pretrain(tiny_config(tmp_path / "run", "data.augment_on=device", "loss.matching=geometric"))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss_local"] > 0 for r in records)
    assert 0 < records[-1]["geo_valid_frac"] <= 1


@pytest.mark.parametrize("path", ["cpu", "cpu_batched", "device"])
def test_loader_workers_persist_and_each_epoch_is_its_own(tmp_path, path):
    """Workers persist across epochs, yet every epoch delivers the sampler's order and (CPU
    multi-crop) the augmentations seeded by that epoch, exactly as with no workers at all."""
    from glsd.data.loader import build_loader

    def epochs(num_workers: int) -> list[torch.Tensor]:
        cfg = tiny_config(tmp_path / "run", f"data.augment_on={path}", f"data.num_workers={num_workers}")
        build = {"cpu": build_loader, "cpu_batched": build_batched_cpu_loader,
                 "device": build_device_loader}[path]
        loader, sampler, _ = build(cfg, synthetic_source(16, 40, 4), 0, 1, pin_memory=False)
        assert loader.persistent_workers == (num_workers > 0)
        out = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            out.append(torch.cat([b.images if path == "device" else b.views[0] for b in loader]))
        return out

    inline, workers = epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))
    assert not torch.equal(inline[0], inline[1])  # a new permutation (and augmentation) each epoch


def test_batched_cpu_loader_delivers_views_seeded_by_the_batch(tmp_path):
    """cpu_batched: workers deliver the same Batch as the PIL path (views, geometry in
    original pixels), drawn by DeviceMultiCrop with a seed from the batch's indices."""
    from glsd.data.multicrop import Batch

    cfg = tiny_config(tmp_path / "run", "data.augment_on=cpu_batched")
    source = synthetic_source(16, 40, 4)
    loader, sampler, _ = build_batched_cpu_loader(cfg, source, 0, 1, pin_memory=False)
    batch = next(iter(loader))
    n_views = cfg.crops.num_global + cfg.crops.num_local
    assert isinstance(batch, Batch) and len(batch.views) == n_views
    assert batch.views[0].shape == (8, 3, cfg.crops.global_size, cfg.crops.global_size)
    assert batch.views[-1].shape == (8, 3, cfg.crops.local_size, cfg.crops.local_size)
    assert batch.geometry.shape == (n_views, 8, 5)
    assert float((batch.geometry[..., 1] + batch.geometry[..., 3]).max()) <= 40 + 1e-4
    # Same indices -> same views (a resume redraws them); other indices or rank -> others.
    items = [loader.dataset[(0, i)] for i in batch.indices.tolist()]
    again = BatchedAugmentCollate(cfg)(items)
    assert all(torch.equal(a, b) for a, b in zip(batch.views, again.views))
    assert torch.equal(batch.geometry, again.geometry)
    assert not torch.equal(BatchedAugmentCollate(cfg, rank=1)(items).geometry, batch.geometry)
    assert not torch.equal(BatchedAugmentCollate(cfg)(items[::-1]).geometry, batch.geometry.flip(1))
    # The same images in another epoch (batch size 1 included) get other views.
    later = [loader.dataset[(1, i)] for i in batch.indices.tolist()]
    assert not torch.equal(BatchedAugmentCollate(cfg)(later).geometry, batch.geometry)
    one = BatchedAugmentCollate(cfg)
    assert not torch.equal(one(items[:1]).geometry, one(later[:1]).geometry)
    # A batch whose every image failed is empty, as on the PIL path.
    empty = BatchedAugmentCollate(cfg)([None, None])
    assert len(empty.indices) == 0 and empty.skipped == 2


def test_pretrain_with_batched_cpu_augmentation(tmp_path):
    from glsd.train.pretrain import pretrain

    run = pretrain(tiny_config(tmp_path / "run", "data.augment_on=cpu_batched", "loss.matching=geometric"))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss_local"] > 0 for r in records)
