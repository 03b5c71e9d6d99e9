"""The one view pipeline: parameters drawn per sample, applied in the workers or on the device.

Parity is checked against tests/view_oracle.py, which applies the same drawn parameters per
image with PIL and ``torchvision.transforms.v2.functional``. Tolerances: 2e-5 for each
photometric operation (float32 against float32, or PIL's double-precision resampling), 1e-4 for
the whole pipeline (normalised values, several operations compounding rounding).
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from glsd.config import CropConfig
from glsd.data.geometry import cell_centers
from glsd.data.loader import StepViews, build_loader
from glsd.data.synthetic import synthetic_source
from glsd.data.view_params import (crop_boxes, draw_view_params, N_UNIFORMS, sample_seed,
                                   training_seed, view_sizes)
from glsd.data.views import (ViewMaker, adjust_brightness, adjust_contrast, adjust_hue,
                             adjust_saturation, crop_resize, gaussian_blur)

from helpers_tiny import tiny_config
from view_oracle import oracle_views, pil_crop_resize

PATHS = ["cpu", "cpu_batched", "device"]
NO_PHOTOMETRIC = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _params(cfg, batch=6, hw=(48.0, 64.0), seed=0):
    seeds = [training_seed(seed, 0, i, i) for i in range(batch)]
    return draw_view_params(cfg, seeds, torch.tensor([list(hw)] * batch))


def _images(batch=6, size=32, seed=0):
    return (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Drawing

def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    u = torch.rand(4000, N_UNIFORMS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hw = torch.tensor([[60.0, 80.0]]).expand(4000, 2)
    top, left, h, w = crop_boxes(u, hw, (0.1, 0.5), (0.75, 4 / 3)).double().unbind(-1)
    assert torch.all(top >= 0) and torch.all(left >= 0)
    assert torch.all(top + h <= 1 + 1e-6) and torch.all(left + w <= 1 + 1e-6)
    area = h * w
    assert area.min() >= 0.1 - 1e-6 and area.max() <= 0.5 + 1e-6 and 0.2 < area.mean() < 0.4
    ratio = (w * 80) / (h * 60)  # in pixels
    assert ratio.min() >= 0.75 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    # A range no crop fits: every box is the central crop of the nearest allowed ratio.
    tall = torch.tensor([[10.0, 100.0]]).expand(5, 2)
    fallback = crop_boxes(u[:5], tall, (1.0, 1.0), (0.75, 4 / 3))
    want = torch.tensor([0.0, (1 - 13.333333 / 100) / 2, 1.0, 13.333333 / 100]).expand(5, 4)
    torch.testing.assert_close(fallback, want, rtol=0, atol=1e-5)


def test_views_depend_on_the_sample_only():
    """A sample's views come from its own seed: the batch around it does not matter."""
    cfg = CropConfig(num_local=3)
    hw = torch.tensor([[40.0, 50.0]] * 4)
    seeds = [training_seed(0, 2, p, 10 + p) for p in range(4)]
    all_four = draw_view_params(cfg, seeds, hw)
    last_two = draw_view_params(cfg, seeds[2:], hw[2:])
    assert torch.equal(all_four.boxes[:, 2:], last_two.boxes) and torch.equal(all_four.order[:, 2:], last_two.order)
    other_epoch = draw_view_params(cfg, [training_seed(0, 3, p, 10 + p) for p in range(4)], hw)
    assert not torch.equal(all_four.boxes, other_epoch.boxes)
    assert sample_seed("views", 0, 1, 2, 3) != sample_seed("views", 0, 1, 2, 4)


def test_blur_radius_reference():
    scaled = _params(CropConfig(num_local=2, blur_p=(1.0, 1.0, 1.0)))
    fixed = _params(CropConfig(num_local=2, blur_p=(1.0, 1.0, 1.0), blur_radius_reference=None))
    assert fixed.sigma.min() >= 0.1 and fixed.sigma.max() <= 2.0 and fixed.sigma.max() > 1.0
    assert torch.allclose(scaled.sigma[:2], fixed.sigma[:2] * 32 / 224)  # same draws, scaled
    assert torch.allclose(scaled.sigma[2:], fixed.sigma[2:] * 16 / 224)
    # The blur kernel reaches 3 of the largest sigma (ceil), at least 1, inside the view: the
    # per-image oracle takes this width from the code, so it is pinned here by hand.
    from glsd.data.views import blur_half_width
    none = CropConfig(blur_radius_reference=None)
    assert [blur_half_width(none, s) for s in (224, 96, 5)] == [6, 6, 4]
    assert [blur_half_width(CropConfig(), s) for s in (224, 96, 32)] == [6, 3, 1]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_resize_of_a_non_square_image_matches_pil(interpolation):
    """Dense evaluation and the pictures cut views out of photos that are not square: the
    separate row and column weights must match PIL's box resize too."""
    cfg = CropConfig(num_local=2, interpolation=interpolation)
    p = _params(cfg)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(len(p.boxes[0]), 3, 40, 64, generator=g)
    for v, size in enumerate(view_sizes(cfg)):
        got = crop_resize(images, p.boxes[v], p.flip[v], size, interpolation)
        want = torch.stack([pil_crop_resize(images[b], p.boxes[v, b], bool(p.flip[v, b]), size, interpolation)
                            for b in range(len(images))])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_per_view_probabilities_and_jitter_strengths():
    cfg = CropConfig(num_local=2, blur_p=(1.0, 0.0, 0.0), solarize_p=1.0, color_jitter_p=1.0,
                     color_jitter=(0.1, 0.0, 0.3, 0.05))
    p = _params(cfg, batch=64)
    assert p.blur[0].all() and not p.blur[1:].any()
    assert p.solarize[1].all() and not p.solarize[0].any() and not p.solarize[2:].any()
    f = p.factors
    assert f[..., 0].min() >= 0.9 and f[..., 0].max() <= 1.1 and torch.all(f[..., 1] == 1.0)
    assert f[..., 2].min() >= 0.7 and f[..., 3].abs().max() <= 0.05
    assert len({tuple(o) for o in p.order.flatten(0, 1).tolist()}) > 12  # per-row orders


# ----------------------------------------------------------------------------------------
# Parity with PIL and torchvision.transforms.v2.functional, row by row

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_resize_matches_pil_box_resize(interpolation):
    cfg = CropConfig(num_local=3, interpolation=interpolation)
    p = _params(cfg)
    images = _images().float() / 255
    for v, size in enumerate(view_sizes(cfg)):
        got = crop_resize(images, p.boxes[v], p.flip[v], size, interpolation)
        want = torch.stack([pil_crop_resize(images[b], p.boxes[v, b], bool(p.flip[v, b]), size, interpolation)
                            for b in range(len(images))])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_operation_matches_torchvision_v2(name):
    ours = {"brightness": adjust_brightness, "contrast": adjust_contrast,
            "saturation": adjust_saturation, "hue": adjust_hue}[name]
    theirs = getattr(TF, f"adjust_{name}")
    x = torch.rand(12, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    x[0] = 0.5  # a gray image, and black / white pixels: the hue conversion's edge cases
    x[1, :, :2] = 0.0
    x[1, :, 2:4] = 1.0
    f = (torch.linspace(-0.5, 0.5, 12) if name == "hue" else torch.linspace(0.0, 2.0, 12))
    got = ours(x.clone(), f)
    want = torch.stack([theirs(x[i], float(f[i])) for i in range(12)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_jitter_in_chunks_is_the_same_operation():
    from glsd.data.views import _in_chunks

    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    f = torch.linspace(-0.4, 0.4, 10)
    assert torch.equal(_in_chunks(adjust_hue, x, f, budget=3 * 64 * 3), adjust_hue(x, f))


def test_blur_grayscale_solarize_normalize_match_torchvision_v2():
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 0.3, 0.8, 1.5, 2.0])
    half = 6
    got = gaussian_blur(x, sigma, half)
    want = torch.stack([TF.gaussian_blur(x[i], [2 * half + 1] * 2, [float(sigma[i])] * 2) for i in range(5)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # The rest is v2 itself, on the selected rows: check that the pipeline routes rows right.
    cfg = CropConfig(num_local=2, **dict(NO_PHOTOMETRIC, grayscale_p=0.5, solarize_p=0.5,
                                         blur_p=(0.5, 0.5, 0.5), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25)))
    p = _params(cfg, batch=16)
    assert p.gray.any() and (~p.gray).any() and p.solarize[1].any() and p.blur.any()
    got = ViewMaker(cfg)(_images(16), p)
    want = oracle_views(_images(16), p, cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_whole_pipeline_matches_the_per_image_oracle(interpolation):
    cfg = CropConfig(num_local=3, interpolation=interpolation, color_jitter_p=0.9)
    p = _params(cfg, batch=8)
    got = ViewMaker(cfg)(_images(8), p)
    want = oracle_views(_images(8), p, cfg)
    assert [g.shape for g in got] == [w.shape for w in want]
    for v, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4, msg=lambda m: f"view {v}: {m}")


# ----------------------------------------------------------------------------------------
# Every path: the loader's views and geometry


def _coordinate_folder(root, hw=(48, 64), n=8):
    """PNGs whose red channel encodes the column, green the row, linearly:
    value = 255 * (coordinate of the pixel centre) / extent."""
    h, w = hw
    (root / "a").mkdir(parents=True)
    for k in range(n):
        xs = (np.arange(w) + 0.5) / w * 255
        ys = (np.arange(h) + 0.5) / h * 255
        rgb = np.stack([np.broadcast_to(xs, (h, w)), np.broadcast_to(ys[:, None], (h, w)),
                        np.full((h, w), 30.0 * k)], -1)
        Image.fromarray(rgb.round().astype(np.uint8)).save(root / "a" / f"{k}.png")


def _loader_views(tmp_path, path, *extra):
    cfg = tiny_config(tmp_path / f"run-{path}", f"data.augment_on={path}", *extra)
    from glsd.data.subset import select_images

    subset = select_images(cfg, None)
    loader, _ = build_loader(cfg, subset, 0, 1, pin_memory=False)
    batch = next(iter(loader))
    views, geometry = StepViews(cfg)(batch, torch.device("cpu"))
    return cfg, batch, views, geometry


@pytest.mark.parametrize("path", PATHS)
def test_geometry_matches_the_pixels_within_a_twentieth_of_a_cell(tmp_path, path):
    """Each cell (4 x 4 per view) shows, on average, the original-image coordinates its
    geometry predicts, within 0.05 cell where no resampling window meets the image border."""
    hw = (48, 64)
    _coordinate_folder(tmp_path / "img", hw)
    photometric = ["crops.color_jitter_p=0", "crops.grayscale_p=0", "crops.blur_p=[0, 0, 0]",
                   "crops.solarize_p=0", "crops.mean=[0, 0, 0]", "crops.std=[1, 1, 1]"]
    cfg, batch, views, geometry = _loader_views(
        tmp_path, path, "data.source=imagefolder", f"data.root={tmp_path / 'img'}", "train.batch_size=8",
        "crops.num_local=4", *photometric)
    assert torch.all(geometry[..., 1] + geometry[..., 3] <= hw[1] + 1e-4)
    assert {0.0, 1.0} <= set(geometry[..., 4].flatten().tolist())
    square = 32  # decoded size: 1 decoded pixel = (1.5, 2) original pixels
    margin = torch.tensor([hw[0], hw[1]]) / square * 4  # border effects of two resamplings
    counted = 0
    for v, view in enumerate(views):
        cell = view.shape[-1] // 4
        pooled = view[:, :2].unfold(2, cell, cell).unfold(3, cell, cell).mean((-1, -2))  # (B, 2, 4, 4)
        seen = torch.stack([pooled[:, 1] * hw[0], pooled[:, 0] * hw[1]], -1).flatten(1, 2)  # (B, 16, (y, x))
        want = cell_centers(geometry[v], (4, 4))  # (B, 16, 2)
        cell_hw = torch.stack([geometry[v, :, 2], geometry[v, :, 3]], -1)[:, None] / 4
        err = ((seen - want).abs() / cell_hw).amax(-1)  # in cells
        lo, hi = want - cell_hw / 2, want + cell_hw / 2
        inside = ((lo >= margin) & (hi <= torch.tensor(hw) - margin)).all(-1)
        assert err[inside].max() < 0.05, f"{path}, view {v}: {err[inside].max():.3f} cell"
        assert err.max() < 0.5
        counted += int(inside.sum())
    assert counted > 0.3 * 16 * len(views) * 8


def test_every_path_makes_the_same_views(tmp_path):
    """augment_on chooses where, not what: the same batch gives the same views."""
    out = {path: _loader_views(tmp_path, path) for path in PATHS}
    _, ref_batch, ref_views, ref_geom = out["cpu"]
    for path in ("cpu_batched", "device"):
        _, batch, views, geometry = out[path]
        assert torch.equal(batch.indices, ref_batch.indices) and torch.equal(geometry, ref_geom)
        for a, b in zip(views, ref_views):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert out["device"][1].views is None and out["device"][1].images.dtype == torch.uint8
    assert out["cpu"][1].views is not None and out["cpu"][1].images is None


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_a_batch_crosses_processes_packed_and_unchanged(tmp_path, path):
    """A worker's batch is pickled as one flat tensor per dtype (not one shared-memory segment
    per tensor) and comes back field for field, dtypes included."""
    import dataclasses
    import pickle

    _, batch, _, _ = _loader_views(tmp_path, path)
    _, args = batch.__reduce__()
    _, spec, flat = args
    crossing = [a for a in (*args, *flat.values()) if isinstance(a, torch.Tensor)]
    dtypes = {t.dtype for t in crossing}
    assert len(crossing) == len(dtypes) == len(flat) >= 2 and len(spec) >= 4  # one tensor per dtype
    back = pickle.loads(pickle.dumps(batch))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, list):
            return len(a) == len(b) and all(map(same, a, b))
        if dataclasses.is_dataclass(a):
            return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
        return a == b

    assert all(same(getattr(batch, f.name), getattr(back, f.name)) for f in dataclasses.fields(batch))
    assert (back.views is None) == (path == "device") and (back.params is None) == (path == "cpu")


@pytest.mark.parametrize("path", ["cpu", "device"])  # cpu_batched: the same loader as cpu
def test_loader_workers_persist_and_each_epoch_is_its_own(tmp_path, path):
    """Workers persist across epochs, yet every epoch delivers the sampler's order and the
    views seeded by that epoch, exactly as with no workers at all."""
    def epochs(num_workers: int) -> list[torch.Tensor]:
        cfg = tiny_config(tmp_path / "run", f"data.augment_on={path}", f"data.num_workers={num_workers}")
        loader, sampler = build_loader(cfg, synthetic_source(16, 40, 4), 0, 1, pin_memory=False)
        assert loader.persistent_workers == (num_workers > 0)
        make = StepViews(cfg)
        out = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            out.append(torch.cat([make(b, torch.device("cpu"))[0][0] for b in loader]))
        return out

    inline, workers = epochs(0), epochs(1)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(inline, workers))
    assert not torch.allclose(inline[0], inline[1])  # a new permutation and new views each epoch


def test_an_all_bad_batch_is_empty(tmp_path):
    from glsd.data.multicrop import ViewCollate
    from glsd.data.sources import Unreadable

    bad = [Unreadable("a.jpg", "cannot identify image file"), Unreadable("b.jpg", "truncated")]
    empty = ViewCollate(CropConfig(), 0, make_views=True)(bad)
    assert len(empty.indices) == 0 and empty.skipped == 2 and empty.unreadable == tuple(bad)


@pytest.mark.parametrize("override", ["crops.color_jitter=[0.4, 0.4, 0.2, 0.7]", "crops.blur_radius=[0, 2]",
                                      "crops.blur_radius_reference=0", "crops.decode_size=0"])
def test_view_recipe_validation(override):
    from glsd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_where_views_are_made_is_not_part_of_a_runs_identity():
    """Switching augment_on changes where, not what: a run may resume under the other."""
    from glsd.config import load_config
    from glsd.config_compare import identity

    assert identity(load_config(None, ["data.augment_on=device"])) == identity(load_config(None, []))
    assert identity(load_config(None, ["crops.color_jitter=[0.1, 0.1, 0.1, 0.1]"])) != identity(load_config(None, []))
