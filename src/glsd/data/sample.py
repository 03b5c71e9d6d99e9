"""The sample image set shipped with the package (``data.source=sample``).

128 small JPEGs (64 x 64 px) of four texture classes (stripes, checks, dots, rings) in an
ImageFolder layout, ``train/<class>/*.jpg`` (24 per class) and ``test/<class>/*.jpg`` (8 per
class), written by ``benchmarks/make_sample_images.py``. Enough to run the whole main job
(pretrain, evaluate, pictures) on a fresh machine with only the package installed; far too
small to learn anything general.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from glsd.config import ConfigError


def sample_root() -> Path:
    """The folder of the sample set inside the installed package."""
    root = Path(str(resources.files("glsd").joinpath("sample")))
    if not (root / "train").is_dir():
        raise ConfigError(f"the sample images are missing from this glsd installation ({root}); "
                          "reinstall glsd, or give your own images with data.root=PATH")
    return root
