"""Labelled dense probe: do the local features say *what* is at each place?

A mosaic is n x n tiles in a random layout, each tile one labelled image prepared as for the
other evaluations (:func:`glsd.eval.features.eval_transform`: resize the short side, centre
crop to S = ``eval.image_size`` or ``crops.global_size``), so the mosaic is nS x nS px and
each tile is seen at the scale the model trained on. The backbone's local feature grid of the
mosaic (``local_feat``, as :mod:`glsd.eval.dense` reads it) gives one feature per cell; a cell
is labelled by the class of the tile under its centre. A linear classifier on the frozen cell
features (:func:`glsd.eval.linear.fit_probe`, about ``eval.seg_steps`` AdamW steps of
``PROBE_BATCH`` cells at ``eval.linear_lr``) is trained on ``eval.seg_num_train`` mosaics of
training images and scored on ``eval.seg_num_test`` mosaics of test images.

Which images: the tiles of one mosaic have different classes while there are enough of them
(a random permutation of the classes, a fresh one appended when n*n exceeds their number),
each tile a random image of its class. The layouts cycle through ``eval.seg_tiles``. All draws
are seeded by ``eval.seg_seed``; train and test mosaics use separate streams.

Scores: ``accuracy`` (fraction of test cells whose class is predicted), ``miou`` (per-class
intersection over union of predicted and true cells, averaged over the classes that occur in
either), both per layout too, and ``chance_accuracy`` (always predicting the most frequent
training class).
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

from glsd.config import Config, ConfigError
from glsd.data.sources import ImageSource
from glsd.data.view_params import sample_seed
from glsd.eval.features import Device, eval_transform, reduced_size
from glsd.eval.linear import fit_probe
from glsd.models.backbone import Backbone

PROBE_BATCH = 1024  # cells per probe step: a mosaic gives dozens to hundreds of cells


def draw_mosaics(labels: Sequence[int], count: int, tiles: Sequence[int], seed: int,
                 stream: str) -> list[list[int]]:
    """``count`` mosaics of a source with these ``labels``: per mosaic, the source indices of
    its n*n tiles in row-major order, n cycling through ``tiles``."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if y >= 0:
            by_class.setdefault(int(y), []).append(i)
    if not by_class:
        raise ConfigError("the segmentation probe needs labelled images")
    classes = sorted(by_class)
    rng = random.Random(sample_seed("seg", stream, seed))
    mosaics = []
    for m in range(count):
        n = tiles[m % len(tiles)]
        order: list[int] = []
        while len(order) < n * n:
            order += rng.sample(classes, len(classes))
        mosaics.append([rng.choice(by_class[c]) for c in order[:n * n]])
    return mosaics


def cell_labels(tile_classes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The class of the tile under each cell centre.

    Args:
        tile_classes: ``(n, n)`` class of each tile of an nS x nS mosaic.
        grid: ``(gh, gw)`` feature grid, its cells tiling the mosaic evenly.
    Returns:
        ``(gh, gw)`` long. Cell r's centre lies at ``(r + 1/2) nS / gh`` px, in tile
        ``floor((2r + 1) n / (2 gh))`` (exact integers; a centre on a tile edge belongs to
        the tile below / right of it).
    """
    n = tile_classes.shape[0]
    gh, gw = grid
    rows = ((2 * torch.arange(gh) + 1) * n) // (2 * gh)
    cols = ((2 * torch.arange(gw) + 1) * n) // (2 * gw)
    return tile_classes[rows][:, cols]


def assemble(tiles: torch.Tensor) -> torch.Tensor:
    """``(n*n, 3, S, S)`` tiles in row-major order -> ``(3, nS, nS)`` mosaic."""
    n = int(round(tiles.shape[0] ** 0.5))
    _, c, s, _ = tiles.shape
    return tiles.view(n, n, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, n * s, n * s)


def cell_scores(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict:
    """``accuracy`` and ``miou`` (fractions) of predicted vs true classes ``(M,)``, and the
    per-class ``iou`` (None for a class absent from both)."""
    if true.numel() == 0:
        return {"accuracy": None, "miou": None, "iou": [None] * num_classes, "n_cells": 0}
    conf = torch.bincount(true.long() * num_classes + pred.long(),
                          minlength=num_classes * num_classes).view(num_classes, num_classes)
    tp = conf.diag().float()
    union = conf.sum(0).float() + conf.sum(1).float() - tp
    present = union > 0
    iou = tp / union.clamp_min(1)
    return {"accuracy": float(tp.sum() / true.numel()), "miou": float(iou[present].mean()),
            "iou": [float(v) if p else None for v, p in zip(iou, present)], "n_cells": int(true.numel())}


@torch.no_grad()
def mosaic_features(backbone: Backbone, source: ImageSource, mosaics: list[list[int]], cfg: Config,
                    device: Device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Cell features of every mosaic (the local grid of one backbone pass on each).

    Returns ``feats (M, D)`` float32 and ``labels (M,)`` long on ``device``, ``layout (M,)``
    (n of the cell's mosaic), and ``{"grids": {n: [gh, gw]}, "skipped": mosaics dropped for
    an unreadable tile}``. Mosaics of one layout are batched, about ``eval.batch_size``
    tiles at a time.
    """
    backbone = getattr(backbone, "module", backbone)
    device = torch.device(device)
    transform = eval_transform(cfg)
    feats, labels, layouts, grids, skipped = [], [], [], {}, 0
    was_training = backbone.training
    backbone.eval()
    try:
        for n in sorted({int(round(len(m) ** 0.5)) for m in mosaics}):
            group = [m for m in mosaics if len(m) == n * n]
            per_batch = max(1, cfg.eval.batch_size // (n * n))
            for start in range(0, len(group), per_batch):
                images, classes = _read_mosaics(source, group[start:start + per_batch], transform, cfg)
                skipped += len(group[start:start + per_batch]) - len(images)
                if not images:
                    continue
                local = backbone(torch.stack(images).to(device)).local_feat  # (B, gh, gw, D)
                grid = tuple(local.shape[1:3])
                grids[n] = list(grid)
                feats.append(local.flatten(0, 2).float())
                labels.append(torch.stack([cell_labels(c, grid) for c in classes]).flatten().to(device))
                layouts.append(torch.full((labels[-1].numel(),), n, dtype=torch.long))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ConfigError(f"no mosaic of {source.name} could be read; check its images")
    return torch.cat(feats), torch.cat(labels), torch.cat(layouts), {"grids": grids, "skipped": skipped}


def _read_mosaics(source: ImageSource, mosaics: list[list[int]], transform, cfg: Config):
    """(mosaic tensors ``(3, nS, nS)``, tile classes ``(n, n)``) of the fully readable ones."""
    images, classes = [], []
    for mosaic in mosaics:
        tiles = [source.load(source.keys[i], cfg.data.on_error, reduced_size(cfg)) for i in mosaic]
        if any(t is None for t in tiles):
            continue
        n = int(round(len(mosaic) ** 0.5))
        images.append(assemble(torch.stack([transform(t) for t in tiles])))
        classes.append(torch.tensor([source.labels[i] for i in mosaic]).view(n, n))
    return images, classes


def run_seg(backbone: Backbone, train: ImageSource, test: ImageSource, cfg: Config, device: Device,
            num_classes: Optional[int] = None) -> dict:
    """The labelled dense probe of a backbone (module docstring); single-process.

    Returns ``accuracy``, ``miou``, ``chance_accuracy``, ``per_layout`` ({n: accuracy, miou,
    n_cells}), per-class ``iou``, the probe's ``train_accuracy`` and ``final_loss``, the
    counts and the settings used.
    """
    e = cfg.eval
    num_classes = num_classes or len(train.classes)
    draws = {name: draw_mosaics(src.labels, count, e.seg_tiles, e.seg_seed, name)
             for name, src, count in (("train", train, e.seg_num_train), ("test", test, e.seg_num_test))}
    x_train, y_train, _, info_train = mosaic_features(backbone, train, draws["train"], cfg, device)
    x_test, y_test, layout, info_test = mosaic_features(backbone, test, draws["test"], cfg, device)
    # A fixed number of probe steps: its fit must not depend on how many cells the grid gives.
    epochs = max(1, round(e.seg_steps / math.ceil(len(x_train) / PROBE_BATCH)))
    scores, loss = fit_probe(x_train, y_train, num_classes, epochs, e.linear_lr, PROBE_BATCH,
                             seed=cfg.train.seed)
    pred, train_pred = _predict(scores, x_test), _predict(scores, x_train)
    majority = torch.bincount(y_train, minlength=num_classes).argmax()
    pred, y_test, y_train = pred.cpu(), y_test.cpu(), y_train.cpu()
    overall = cell_scores(pred, y_test, num_classes)
    per_layout = {}
    for n in sorted(set(layout.tolist())):
        sel = layout == n
        s = cell_scores(pred[sel], y_test[sel], num_classes)
        per_layout[f"{n}x{n}"] = {"accuracy": s["accuracy"], "miou": s["miou"], "n_cells": s["n_cells"],
                                  "grid": info_test["grids"][n]}
    return {"accuracy": overall["accuracy"], "miou": overall["miou"],
            "chance_accuracy": float((y_test == majority.cpu()).float().mean()),
            "per_layout": per_layout, "iou": overall["iou"],
            "train_accuracy": float((train_pred.cpu() == y_train).float().mean()), "final_loss": loss,
            "n_train_cells": int(y_train.numel()), "n_test_cells": int(y_test.numel()),
            "n_train_mosaics": len(draws["train"]) - info_train["skipped"],
            "n_test_mosaics": len(draws["test"]) - info_test["skipped"],
            "tiles": list(e.seg_tiles), "tile_size": e.image_size or cfg.crops.global_size,
            "steps": epochs * math.ceil(len(x_train) / PROBE_BATCH), "epochs": epochs, "lr": e.linear_lr, "batch_size": PROBE_BATCH, "seed": e.seg_seed}


def _predict(scores, feats: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Predicted class ``(M,)`` of ``(M, D)`` cell features, in chunks (a standardised copy of
    all of them at once would double their memory)."""
    return torch.cat([scores(feats[i:i + chunk]).argmax(1) for i in range(0, len(feats), chunk)])
