#!/usr/bin/env python
"""Write the sample image set shipped with glsd (``src/glsd/sample/``, ``data.source=sample``).

Four classes of synthetic textures, each image drawn from its own seed, so the set is the same
on every run of this script: ``stripes`` (oriented gratings), ``checks`` (rotated
checkerboards), ``dots`` (scattered discs) and ``rings`` (concentric rings about a random
centre). Colours, scale, orientation, lighting gradient and sensor-like noise vary per image,
so a network has to learn the pattern rather than a colour. ImageFolder layout:
``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

    python benchmarks/make_sample_images.py            # rewrites src/glsd/sample/
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("stripes", "checks", "dots", "rings")
SPLITS = {"train": 24, "test": 8}  # images per class
SIZE = 64
QUALITY = 80


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart to show the pattern, in [0, 1]."""
    while True:
        a, b = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
        if np.abs(a - b).sum() > 0.8:
            return a, b


def _pattern(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, n)`` values in [0, 1] of one class's pattern."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / n
    theta = rng.uniform(0, np.pi)
    u, v = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
    freq = rng.uniform(3.0, 7.0)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
    if kind == "checks":
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float64)
    if kind == "rings":
        cy, cx = rng.uniform(0.2, 0.8, 2)
        r = np.hypot(y - cy, x - cx)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * 1.5 * r)
    out = np.zeros((n, n))
    for _ in range(int(rng.integers(6, 14))):  # dots
        cy, cx, rad = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.12)
        out = np.maximum(out, (np.hypot(y - cy, x - cx) < rad).astype(np.float64))
    return out


def make_image(kind: str, seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    a, b = _palette(rng)
    p = _pattern(kind, rng, size)[..., None]
    img = a * (1 - p) + b * p
    y, x = np.mgrid[0:size, 0:size] / size  # a soft lighting gradient across the image
    g = rng.uniform(-1, 1, 2)
    img = img * (0.8 + 0.2 * (g[0] * (y - 0.5) + g[1] * (x - 0.5)))[..., None]
    img = img + rng.normal(0, 0.04, img.shape)  # sensor-like noise
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))


def write_set(out: Path) -> tuple[int, int]:
    """(number of files, total bytes) written under ``out``."""
    if out.exists():
        shutil.rmtree(out)
    files, total = 0, 0
    for s, (split, per_class) in enumerate(SPLITS.items()):
        for c, kind in enumerate(CLASSES):
            folder = out / split / kind
            folder.mkdir(parents=True)
            for i in range(per_class):
                path = folder / f"{kind}_{i:03d}.jpg"
                make_image(kind, seed=(s * 100 + c) * 1000 + i).save(path, quality=QUALITY)
                files, total = files + 1, total + path.stat().st_size
    return files, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "glsd" / "sample")
    args = ap.parse_args(argv)
    files, total = write_set(args.out)
    print(f"wrote {files} images, {total / 1024:.0f} KiB, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
