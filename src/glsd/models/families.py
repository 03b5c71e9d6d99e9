"""Backbone families by timm name prefix: the one home of these lists (torch-free, so the
config can check a ViT's patch size without importing timm)."""
from __future__ import annotations

import re
from typing import Optional

# Plain ViTs: a patch embedding and tokens; they take any multiple of the patch size when
# built with dynamic_img_size.
VIT_FAMILIES = ("vit", "deit", "deit3", "eva", "eva02", "beit")
# Swin: patch embedding + patch merging; built for a fixed size unless strict_img_size=False.
SWIN_FAMILIES = ("swin", "swinv2")
# Families whose constructor gets model.drop_path_rate (so timm's own default, 0.1 for Swin,
# does not decide it); by name prefix, as stored runs were built.
DROP_PATH_FAMILIES = VIT_FAMILIES + SWIN_FAMILIES + ("resnet", "resnetv2", "convnext")
GLSD_CONVNET = "glsd_convnet"


def family(backbone: str) -> str:
    """``vit_small_patch16_224`` -> ``vit``."""
    return backbone.split("_")[0]


def is_vit(backbone: str) -> bool:
    return family(backbone) in VIT_FAMILIES


def is_swin(backbone: str) -> bool:
    return family(backbone) in SWIN_FAMILIES


def patch_from_name(backbone: str) -> Optional[int]:
    """ViT-family names carry their patch size (vit_small_patch16_224 -> 16)."""
    match = re.search(r"patch(\d+)", backbone)
    return int(match.group(1)) if match and is_vit(backbone) else None
