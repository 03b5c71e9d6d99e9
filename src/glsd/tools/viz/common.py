"""What every picture shares: figures without pyplot, image reading, the backbone to draw.

matplotlib is an optional extra (``pip install -e .[viz]``). It is imported inside the functions,
through its object-oriented API only (no pyplot), so drawing neither needs a display nor
touches the global pyplot state of a caller's session.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from glsd.config import Config, load_config
from glsd.eval.features import frozen_backbone, load_backbone
from glsd.models.backbone import Backbone

PathLike = Union[str, Path]
DPI = 100
DISPLAY_MIN_PX = 256


class VizError(ValueError):
    """A picture cannot be made from the given inputs; the message says why and the fix."""


class MatplotlibMissing(ImportError):
    """matplotlib (the ``viz`` extra) is not installed."""


def figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure without pyplot; raises MatplotlibMissing naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing("glsd pictures need matplotlib, an optional extra: "
                                "pip install -e '.[viz]' (or pip install 'glsd[viz]')") from None
    return Figure(figsize=figsize, dpi=dpi)


def save(fig, out: PathLike) -> Path:
    """Save at the figure's own size (no tight bbox): the PNG is figsize * dpi pixels."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise VizError(f"--out {out}: pictures are PNG files; name it {out.stem}.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=fig.dpi, format="png")
    except OSError as e:
        raise VizError(f"cannot write {out} ({e.strerror or e})") from None
    return out


def read_image(path: PathLike) -> Image.Image:
    from glsd.data.image_file import open_regular, to_rgb, upright
    from glsd.errors import DataError

    try:
        with open_regular(Path(path)) as f, Image.open(f) as img:
            img.load()
            return to_rgb(upright(img))
    except Image.DecompressionBombError as e:
        raise VizError(f"refusing image {path}: it decodes to more pixels than PIL allows ({e}); "
                       "give a smaller image") from None
    except (OSError, ValueError, DataError) as e:
        why = "not an image file PIL can read" if "cannot identify image file" in str(e) else str(e)
        raise VizError(f"cannot read image {path}: {why}") from None


def upscale(img: Image.Image, min_px: int = DISPLAY_MIN_PX,
            resample=Image.Resampling.NEAREST) -> Image.Image:
    """Enlarge by an integer factor until the short side is >= ``min_px`` (CIFAR's 32 px
    would be a smudge); larger images are returned as they are."""
    factor = max(1, -(-min_px // min(img.size)))
    return img if factor == 1 else img.resize((img.width * factor, img.height * factor), resample)


def picture_backbone(run_dir: Optional[PathLike], config: Optional[str], overrides: Sequence[str] = (),
                     random_init: bool = False) -> tuple[Backbone, Config, str]:
    """(backbone in eval mode on the CPU, config, a label) for a picture.

    A run folder gives its teacher (or, with ``random_init``, a fresh backbone of its
    architecture); without one, ``config`` (a preset or YAML path) gives a random backbone
    seeded by ``train.seed``.
    """
    if run_dir is not None and config:
        raise VizError(f"give a run folder ({run_dir}) or --config {config}, not both: the run's own "
                       "config builds its backbone (change its crops with key=value overrides)")
    if run_dir is not None:
        backbone, cfg, info = load_backbone(run_dir, "teacher", random_init=random_init, overrides=overrides)
        step = f", step {info['step']}" if info.get("step") is not None else ""
        return backbone, cfg, f"{Path(run_dir).name} ({info['model']}{step})"
    if not config:
        raise VizError("give a run folder, or --config PRESET_OR_YAML for a random-init backbone")
    cfg = load_config(config, overrides)
    return frozen_backbone(cfg), cfg, f"{cfg.preset or config} (random init)"


def normalize(cfg: Config, view: Image.Image) -> torch.Tensor:
    """PIL view -> ``(1, 3, S, S)`` normalised tensor (no colour augmentation: the picture is
    about geometry, and the same view is shown as the network saw it)."""
    x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.crops.mean).view(3, 1, 1)
    std = torch.tensor(cfg.crops.std).view(3, 1, 1)
    return ((x - mean) / std)[None]
