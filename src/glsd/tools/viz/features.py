"""The features picture: the first three principal components of a view's local features
as RGB and, for ViTs, the CLS attention of the last block."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from glsd.eval.features import eval_transform
from glsd.models.backbone import Backbone
from glsd.tools.viz.common import DPI, PathLike, figure, picture_backbone, read_image, save, upscale

FEATURES_FIGSIZE = (12.0, 4.6)  # inches; times dpi gives the PNG size


def _last_attention(backbone: Backbone):
    """The last block's timm Attention module of a ViT with a class token, else None."""
    blocks = getattr(backbone.model, "blocks", None)
    if not backbone.has_class_token or not blocks:  # register tokens alone are not a class token
        return None
    attn = getattr(blocks[-1], "attn", None)
    ok = attn is not None and hasattr(attn, "qkv") and hasattr(attn, "num_heads")
    return attn if ok else None


def attention_probs(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a timm Attention module, recomputed from its qkv linear.

    Args:
        attn: the module (``.qkv``, ``.num_heads``; optional ``.q_norm``/``.k_norm``/``.scale``).
        x: ``(B, N, C)`` its input (tokens after the block's norm1).
    Returns:
        ``(B, heads, N, N)`` attention weights, rows summing to 1.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x)  # (B, N, 3 * heads * head_dim)
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scale = getattr(attn, "scale", head_dim ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def features_and_attention(backbone: Backbone,
                           x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local features and, for ViTs, the CLS token's last-block attention to the patches.

    Args:
        x: ``(1, 3, H, W)`` one normalised image.
    Returns:
        local ``(gh, gw, D)`` and cls_attention ``(gh, gw)`` averaged over heads (None when
        the backbone is not a timm ViT with a class token).
    """
    attn = _last_attention(backbone)
    seen: dict = {}
    # The attention module's input is captured during the normal forward, so the picture
    # shows exactly the network's own pass (norms, layer scale, registers included).
    handle = None if attn is None else attn.register_forward_pre_hook(
        lambda mod, args: seen.setdefault("x", args[0]))
    try:
        local = backbone(x).local_feat[0]
    finally:
        if handle is not None:
            handle.remove()
    if attn is None:
        return local, None
    probs = attention_probs(attn, seen["x"])  # (1, heads, N, N)
    cls = probs[0, :, 0, backbone.num_prefix_tokens:].mean(dim=0)  # (gh * gw,)
    return local, cls.reshape(local.shape[:2])


def pca_rgb(local: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """First three principal components of ``(gh, gw, D)`` features as ``(gh, gw, 3)`` RGB
    in [0, 1] (each component min-max scaled), and their explained variance fractions."""
    gh, gw, d = local.shape
    x = local.reshape(gh * gw, d).float()
    x = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = x @ vh[:3].T  # (N, <=3)
    if comps.shape[1] < 3:  # fewer cells or channels than 3: pad with grey
        comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - comps.shape[1])], dim=1)
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    rgb = (comps - lo) / (hi - lo).clamp(min=1e-8)
    var = s.pow(2) / s.pow(2).sum().clamp(min=1e-12)
    return rgb.reshape(gh, gw, 3), var[:3].tolist()


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(gh, gw, C)`` -> ``(H, W, C)`` numpy, nearest (each cell stays a visible block)."""
    x = grid.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=size, mode="nearest")[0].permute(1, 2, 0).numpy()


def center_square(img: Image.Image) -> Image.Image:
    """The central square crop: what ``eval_transform`` (resize short side, centre crop) sees."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def show_features(run_dir: Optional[PathLike], image: PathLike, out: PathLike, overrides: Sequence[str] = (),
                  config: Optional[str] = None, random_init: bool = False, dpi: int = DPI) -> Path:
    """Write the features picture (``FEATURES_FIGSIZE * dpi`` pixels): the image as the model
    sees it (eval transform), the PCA of its local features, and the CLS attention map (ViT)
    or the local feature norm (other backbones)."""
    backbone, cfg, label = picture_backbone(run_dir, config, overrides, random_init)
    square = center_square(read_image(image))
    local, cls_attn = features_and_attention(backbone, eval_transform(cfg)(square)[None])
    shown = upscale(square)  # nearest: no invented detail, and the PNG stays small
    size = (shown.height, shown.width)
    rgb, var = pca_rgb(local)
    fig = figure(FEATURES_FIGSIZE, dpi)
    axes = fig.subplots(1, 3)
    axes[0].imshow(np.asarray(shown))
    axes[0].set_title(f"input ({cfg.eval.image_size or cfg.crops.global_size} px to the model)", fontsize=10)
    axes[1].imshow(_upsample(rgb, size))
    axes[1].set_title("local features: PC1-3 as RGB\n(explained variance "
                      + "/".join(f"{100 * v:.0f}" for v in var) + " %)", fontsize=10)
    heat, title = (cls_attn, "CLS attention, last block\n(mean over heads)") if cls_attn is not None \
        else (local.float().norm(dim=-1), "local feature norm\n(not a ViT: no CLS attention)")
    axes[2].imshow(np.asarray(shown.convert("L")), cmap="gray")
    axes[2].imshow(_upsample(heat[..., None], size)[..., 0], cmap="inferno", alpha=0.6)
    axes[2].set_title(title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{label}: {local.shape[0]}x{local.shape[1]} grid of {local.shape[2]}-d local features",
                 fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.78, bottom=0.02, wspace=0.05)
    return save(fig, out)
