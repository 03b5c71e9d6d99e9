"""Load a trained backbone for evaluation and extract frozen features from it.

A backbone can come from three places:

* a run folder: config from ``config.yaml`` (else the checkpoint's), weights of the teacher or
  student from ``checkpoints/last.pt`` (the teacher falls back to ``backbone.safetensors``);
* a bare ``backbone.safetensors``: the teacher; config from its metadata, else a sibling
  ``config.yaml``;
* a checkpoint file (``*.pt``) written by the training loop.

:mod:`glsd.eval.locate` finds them; checkpoints are read only through
:func:`glsd.train.checkpoint.load_checkpoint` (weights-only).
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from glsd.config import Config, ConfigError, apply_overrides
from glsd.data.sources import ImageSource
from glsd.errors import is_out_of_memory
from glsd.data.workers import leave_stop_signals_to_the_trainer, stop_workers_at_exit
from glsd.models.backbone import Backbone, build_backbone, last_stage
from glsd.utils.distributed import all_gather_cat, rank_world
from glsd.weights import load_checked_weights
from glsd.eval.locate import locate

Device = Union[str, torch.device]
MODELS = ("teacher", "student")
FEATURES = ("auto", "cls", "pooled")


# ----------------------------------------------------------------------------------------
# Loading

def load_backbone(path: Union[str, Path], which: Optional[str] = "teacher", random_init: bool = False,
                  overrides: Sequence[str] = ()) -> tuple[Backbone, Config, dict]:
    """Rebuild a run's backbone (eval mode, frozen, on the CPU).

    Args:
        path: a run folder, a ``backbone.safetensors``, a checkpoint ``.pt`` file, or a
            ``glsd export`` folder (or its ``model.safetensors``).
        which: "teacher" or "student"; None takes ``eval.model`` from the (overridden) config.
        random_init: same architecture, fresh weights seeded by ``train.seed`` (the k-NN
            floor); no weights are read.
        overrides: dotted ``key=value`` strings applied on top of the run's config (mostly
            ``eval.*``; changing ``model.*`` makes the stored weights not fit).
    Returns:
        (backbone, config, info) where info records ``path``, ``run_dir`` (the run folder;
        for a file, the folder it lies in, or the run above ``checkpoints/``), ``checkpoint``
        (file the weights came from, or None), ``model``
        ("teacher", "student" or "random-init"), ``step`` and ``epoch`` (None if unknown).
    """
    path = Path(path)
    raw, loader, info = locate(path)
    cfg = apply_overrides(raw, overrides)
    which = cfg.eval.model if which is None else which
    if which not in MODELS:
        raise ConfigError(f"which={which!r}: use one of {', '.join(MODELS)}")
    backbone = frozen_backbone(cfg)
    if random_init:
        info.update(model="random-init", checkpoint=None, step=None, epoch=None)
    else:
        state, meta = loader(which)
        _load_weights(backbone, state, meta["checkpoint"], cfg)
        info.update(model=which, **meta)
    return backbone, cfg, info


def frozen_backbone(cfg: Config) -> Backbone:
    """The backbone ``cfg`` describes, in eval mode without gradients, its random weights
    seeded by ``train.seed`` (the random-init floor is the same network every time) without
    touching the caller's random state."""
    # Eval mode ignores stochastic depth anyway; building without it keeps the module lean.
    model_cfg = dataclasses.replace(cfg.model, drop_path_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = build_backbone(model_cfg, cfg.crops.global_size)
    return backbone.eval().requires_grad_(False)


def _load_weights(backbone: Backbone, state: dict, source: str, cfg: Config) -> None:
    load_checked_weights(backbone.model, state, source,
                         f"model.backbone={cfg.model.backbone!r} as configured (the weights may be "
                         "another run's, or model.* keys overridden); evaluate the run they come "
                         "from, or the architecture alone with --random-init")


# ----------------------------------------------------------------------------------------
# Extraction

def eval_transform(cfg: Config) -> T.Compose:
    """PIL image -> ``(3, S, S)`` tensor: resize (short side), center crop, normalise.

    ``S`` is ``eval.image_size``, else ``crops.global_size`` (the size the model trained on).
    """
    size = cfg.eval.image_size or cfg.crops.global_size
    interp = InterpolationMode.BICUBIC if cfg.crops.interpolation == "bicubic" else InterpolationMode.BILINEAR
    return T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(cfg.crops.mean, cfg.crops.std)])


def reduced_size(cfg: Config) -> int:
    """The side an evaluation image is resized to, for a reduced JPEG decode that keeps both
    sides at least that (``data.jpeg_draft``); 0 decodes at full size."""
    return (cfg.eval.image_size or cfg.crops.global_size) if cfg.data.jpeg_draft else 0


def resolve_feature(backbone: Backbone, feature: str) -> str:
    """"auto" -> the backbone's own global feature; checks that "cls" exists."""
    if feature not in FEATURES:
        raise ConfigError(f"eval.features={feature!r}: use one of {', '.join(FEATURES)}")
    if feature == "auto":
        return backbone.global_feature
    if feature == "cls" and not backbone.has_class_token:
        raise ConfigError("eval.features=cls needs a ViT with a class token; use pooled or auto")
    return feature


def embed(backbone: Backbone, images: torch.Tensor, feature: str,
          local: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """images ``(B, 3, H, W)`` -> ``(B, D)`` float32 global feature of a resolved kind.

    With ``local=True`` also the pooled local feature (mean of the ``(B, h, w, D)`` grid),
    from the same forward pass: returns ``(global (B, D), pooled_local (B, D))``.
    """
    if feature == "cls" and backbone.global_feature != "cls":
        # Read the token directly (the backbone is configured to pool for training), and the
        # local grid from the same forward pass.
        tokens, grid = last_stage(backbone.model, images)  # (B, P + N, D), (B, D, gh, gw)
        # A copy, not a view of the token tensor: a batch kept in a list would hold every token.
        g = tokens[:, 0].to(torch.float32, copy=True)
        return (g, grid.mean(dim=(2, 3)).float()) if local else g
    out = backbone(images)
    pooled = out.local_feat.mean(dim=(1, 2)).float()
    g = pooled if feature == "pooled" else out.global_feat.to(torch.float32, copy=True)
    return (g, pooled) if local else g


class _EvalImages(Dataset):
    """Items ``indices`` of a source -> (image tensor, label, index), or the index alone for an
    unreadable file."""

    def __init__(self, source: ImageSource, indices: range, transform, on_error: str, min_size: int = 0):
        self.source, self.indices, self.transform, self.on_error = source, indices, transform, on_error
        self.min_size = min_size  # a JPEG may be decoded at reduced scale, both sides >= this

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        img = self.source.load(self.source.keys[index], self.on_error, self.min_size)
        if img is None:
            return index
        return self.transform(img), self.source.labels[index], index


@dataclasses.dataclass
class _Batch:
    images: Optional[torch.Tensor]  # (B, 3, S, S), None when every image was unreadable
    labels: Optional[torch.Tensor]  # (B,) long
    indices: list[int]  # source indices of the rows
    bad: list[int]  # source indices of the unreadable files


def _collate(items: list) -> _Batch:
    good = [it for it in items if not isinstance(it, int)]
    bad = [it for it in items if isinstance(it, int)]
    if not good:
        return _Batch(None, None, [], bad)
    return _Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.long),
                  [g[2] for g in good], bad)


def progress_bar(total: int, desc: Optional[str], unit: str = "img"):
    """A tqdm bar on a terminal (rank 0 only) when ``desc`` is given, else None."""
    if desc is None or rank_world()[0] != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


@torch.no_grad()
def iter_features(backbone: Backbone, source: ImageSource, cfg: Config, device: Device,
                  feature: str = "auto", local: bool = False, indices: Optional[range] = None,
                  progress: Optional[str] = None) -> Iterator[tuple]:
    """Batches of features of ``source`` items ``indices`` (all by default), in order.

    Batched (``eval.batch_size``, ``data.num_workers``), no grad, eval mode (the module's mode
    is restored after); preprocessing is :func:`eval_transform`. ``progress``: the label of a
    progress bar shown on a terminal.

    Yields:
        ``(rows, global (b, D), pooled_local (b, D) or None, labels (b,), bad)`` per batch:
        ``rows`` the source indices of the b readable images, ``bad`` those of unreadable
        ones (skipped under ``data.on_error=skip``; ``fail`` raises).
    """
    backbone = getattr(backbone, "module", backbone)  # a DDP wrapper would sync needlessly
    feature = resolve_feature(backbone, feature)
    device = torch.device(device)
    indices = range(len(source)) if indices is None else indices
    stop_workers_at_exit()
    loader = DataLoader(_EvalImages(source, indices, eval_transform(cfg), cfg.data.on_error, reduced_size(cfg)),
                        batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda",
                        worker_init_fn=leave_stop_signals_to_the_trainer)  # online k-NN mid-run
    bar = progress_bar(len(indices), progress)
    was_training = backbone.training
    backbone.eval()
    try:
        check_input_size(backbone, cfg.eval.image_size or cfg.crops.global_size, device, feature)
        for batch in loader:
            if bar is not None:
                bar.update(len(batch.indices) + len(batch.bad))
            if batch.images is None:
                yield [], None, None, None, batch.bad
                continue
            out = embed(backbone, batch.images.to(device, non_blocking=True), feature, local)
            g, loc = out if local else (out, None)
            yield batch.indices, g, loc, batch.labels.to(device), batch.bad
    finally:
        backbone.train(was_training)
        if bar is not None:
            bar.close()


@torch.no_grad()
def check_input_size(backbone: Backbone, size: int, device: torch.device, feature: str) -> None:
    """One blank image of the evaluation size through the backbone before any image is read:
    a size the model cannot take (a ViT's size not a multiple of its patch, a size under a conv
    net's strides) is one line naming the key, not a traceback from inside the model."""
    try:
        embed(backbone, torch.zeros(1, 3, size, size, device=device), feature, False)
    except (RuntimeError, AssertionError, ValueError) as e:
        if is_out_of_memory(e):
            raise
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the model cannot take {size} px images ({detail}); set eval.image_size "
                          f"to a size it trained on (crops.global_size is one)") from None


@torch.no_grad()
def extract_features(backbone: Backbone, source: ImageSource, cfg: Config, device: Device,
                     feature: str = "auto", progress: Optional[str] = None,
                     gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Global features of every image of ``source``, in source order (see :func:`iter_features`).

    Under an initialised process group each rank extracts a contiguous shard and the shards
    are all-gathered, so every rank returns the full result (call it on all ranks); with
    ``gather=False`` each rank returns its own shard (a k-NN bank: ``knn_classify(sharded=True)``).
    Unreadable images are skipped (``data.on_error=skip``) with a warning.

    Returns:
        feats ``(N, D)`` float32 and labels ``(N,)`` long (-1 where unlabeled), on ``device``.
    """
    device = torch.device(device)
    rank, world = rank_world()
    n = len(source)
    shard = range(n * rank // world, n * (rank + 1) // world)
    feats, labels, skipped = [], [], []
    for _, g, _, y, bad in iter_features(backbone, source, cfg, device, feature, indices=shard,
                                         progress=progress):
        skipped += [source.keys[int(i)] for i in bad]
        if g is not None:
            feats.append(g)
            labels.append(y)
    dim = getattr(backbone, "module", backbone).embed_dim
    feats_t = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if world > 1 and gather:
        feats_t, labels_t = gather_uneven(feats_t, labels_t)
    if skipped:
        named = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"{len(skipped)} unreadable images of {source.name} skipped ({named}); "
                      "fix or remove them")
    return feats_t, labels_t


def gather_uneven(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather per-rank ``(n_r, D)`` / ``(n_r,)`` of different n_r, in rank order.

    ``all_gather`` needs equal shapes, so each rank pads to the largest n_r and the padding
    is cut off after the gather.
    """
    count = torch.tensor([feats.shape[0]], device=feats.device)
    sizes = [int(s) for s in all_gather_cat(count).tolist()]
    most = max(sizes)
    padded_f = feats.new_zeros(most, feats.shape[1])
    padded_f[:feats.shape[0]] = feats
    padded_l = labels.new_full((most,), -1)
    padded_l[:labels.shape[0]] = labels
    all_f, all_l = all_gather_cat(padded_f), all_gather_cat(padded_l)
    keep = torch.cat([torch.arange(s, device=feats.device) + r * most for r, s in enumerate(sizes)])
    return all_f[keep], all_l[keep]
