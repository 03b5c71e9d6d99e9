"""Generated images: a coloured shape (the class) at a random place on noise, the same for
the same index and seed. For tests, benchmarks and ``data.source=synthetic``.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from glsd.data.sources import ImageSource


SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars", "checker", "diamond")


def synthetic_image(index: int, size: int, num_classes: int, seed: int = 0) -> tuple[Image.Image, int]:
    """A deterministic image: a coloured shape (the class) at a random place on noise."""
    rng = random.Random(seed * 1_000_003 + index)
    label = index % num_classes
    noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 80, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    color = tuple(rng.randrange(120, 256) for _ in range(3))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = SHAPES[label % len(SHAPES)]
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=color)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(1, int(r / 3)))
    elif shape == "bars":
        for k in range(3):
            x = cx - r + k * r * 0.8
            draw.rectangle((x, cy - r, x + r / 3, cy + r), fill=color)
    elif shape == "checker":
        h = r / 2
        for a in range(4):
            for b in range(4):
                if (a + b) % 2 == 0:
                    draw.rectangle((cx - r + a * h, cy - r + b * h, cx - r + (a + 1) * h, cy - r + (b + 1) * h), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    return img, label


def synthetic_source(num_images: int, size: int, num_classes: int, seed: int = 0) -> ImageSource:
    return ImageSource(f"synthetic:{seed}", [str(i) for i in range(num_images)],
                       [i % num_classes for i in range(num_images)],
                       list(SHAPES[:num_classes]), _SyntheticReader(size, num_classes, seed))


class _SyntheticReader:
    """:func:`synthetic_image` by index key; picklable like _FileReader."""

    def __init__(self, size: int, num_classes: int, seed: int):
        self.size, self.num_classes, self.seed = size, num_classes, seed

    def __call__(self, key: str) -> Image.Image:
        return synthetic_image(int(key), self.size, self.num_classes, self.seed)[0]
