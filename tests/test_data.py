"""Data sources, image modes, subsets and the multi-crop views' geometry."""
import io
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from glsd.config import ConfigError, CropConfig, DataConfig
from glsd.data.geometry import cell_centers
from glsd.data.multicrop import MultiCrop
from glsd.data.sources import balanced_subset, open_source, to_rgb


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (10, 7))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (10, 7)


def test_palette_with_transparency_becomes_rgb():
    img = Image.new("P", (4, 4))
    img.info["transparency"] = 0
    assert to_rgb(img).mode == "RGB"


def _folder_tree(root, classes=("a", "b"), per_class=3, size=(12, 9), mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, color=i * 40).save(root / c / f"{i}.png")


def test_imagefolder_source_reads_rgb(tmp_path):
    _folder_tree(tmp_path / "data", mode="L")
    src = open_source(DataConfig(root=str(tmp_path / "data")))
    assert src.classes == ["a", "b"] and len(src) == 6 and src.labels == [0, 0, 0, 1, 1, 1]
    assert src.read(src.keys[0]).mode == "RGB"


def test_flat_folder_source_is_unlabelled(tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    src = open_source(DataConfig(root=str(tmp_path)))
    assert len(src) == 4 and set(src.labels) == {-1}


def test_zip_source_reads_in_place_and_checks_split(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                for i in range(2):
                    zf.writestr(f"{split}/{c}/{i}.png", _png(Image.new("RGBA", (6, 6))))
    src = open_source(DataConfig(root=str(path), split="test"))
    assert len(src) == 4 and src.classes == ["cat", "dog"]
    assert src.read(src.keys[-1]).mode == "RGB"
    with pytest.raises(ConfigError, match="available: test, train"):
        open_source(DataConfig(root=str(path), split="val"))


def test_balanced_subset_keeps_class_proportions_and_is_seeded():
    src = open_source(DataConfig(source="synthetic", synthetic_num_images=100, synthetic_num_classes=4))
    keys = balanced_subset(src, fraction=0.2, seed=3)
    labels = [src.labels[src.keys.index(k)] for k in keys]
    assert len(keys) == 20 and all(labels.count(c) == 5 for c in range(4))
    assert keys == balanced_subset(src, fraction=0.2, seed=3)
    assert keys != balanced_subset(src, fraction=0.2, seed=4)
    assert len(balanced_subset(src, num_images=7, seed=0)) == 7


def _coordinate_image(h: int, w: int) -> Image.Image:
    """Red = column, green = row (both scaled to 0..255), so a pixel tells where it came from."""
    xs = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    rgb = np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("source_hw", [(96, 128), (8, 6)])  # the second is smaller than a crop
def test_view_content_sits_where_its_geometry_says(source_hw):
    """The geometry is computed from the crop parameters, not measured; check it against the
    pixels: each cell of a view shows the original-image location its centre claims."""
    h, w = source_hw
    cfg = CropConfig(global_size=32, local_size=16, num_local=2, color_jitter_p=0.0, grayscale_p=0.0,
                     blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, interpolation="bilinear",
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    crop = MultiCrop(cfg)
    random.seed(0)
    torch.manual_seed(0)
    img = _coordinate_image(h, w)
    seen_flip = set()
    for _ in range(12):
        views, geometry = crop(img)
        for view, geom in zip(views, geometry):
            grid = (4, 4)
            centers = cell_centers(geom, grid)  # (16, 2) (y, x) in original pixels
            cell = view.shape[-1] // 4
            pooled = view.unfold(1, cell, cell).unfold(2, cell, cell).mean((-1, -2))  # (3, 4, 4)
            x_seen = pooled[0].flatten() * (w - 1)  # red channel back to original columns
            y_seen = pooled[1].flatten() * (h - 1)
            # pixel centres: continuous coordinate c maps to pixel index c - 0.5
            assert torch.allclose(x_seen, (centers[:, 1] - 0.5).clamp(0, w - 1), atol=0.02 * w + 0.6)
            assert torch.allclose(y_seen, (centers[:, 0] - 0.5).clamp(0, h - 1), atol=0.02 * h + 0.6)
            assert (centers[:, 1] >= 0).all() and (centers[:, 1] <= w).all()
            seen_flip.add(bool(geom[4]))
    assert seen_flip == {True, False}
