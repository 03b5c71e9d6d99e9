"""Backbones with one uniform output: a global embedding and a grid of local features.

Every timm model (and glsd's conv net) declares how to read it: ``forward_intermediates``
returns the last stage as an NCHW map whatever the family (ViT tokens are reshaped by timm,
prefix tokens split off; Swin's NHWC maps are permuted), :func:`has_class_token` reads whether a
class token exists (register tokens are prefix tokens too, so ``num_prefix_tokens`` only says
how many to strip), and ``feature_info[-1]["reduction"]`` is the total stride from image to
grid. Nothing here guesses a layout from shapes.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import timm
import torch
from torch import nn

from glsd.config import ConfigError, ModelConfig
from glsd.models.convnet import ConvNet
from glsd.models.families import DROP_PATH_FAMILIES, GLSD_CONVNET, family, is_swin, is_vit


@dataclass
class BackboneOutput:
    global_feat: torch.Tensor  # (B, D): CLS token or mean-pooled local features
    local_feat: torch.Tensor  # (B, H, W, D): one feature per grid cell, row-major


def declared_layout(model: nn.Module) -> str:
    """The layout of ``forward_features`` as the model declares it: ``tokens`` (ViT family,
    ``(B, P + H*W, D)``), ``nhwc`` (``output_fmt="NHWC"``: Swin) or ``nchw``."""
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed"):
        return "tokens"
    return "nhwc" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "nchw"


def declared_stride(model: nn.Module) -> Optional[int]:
    """Total stride image -> last feature map (``feature_info``), None if undeclared."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and "reduction" in info[-1]:
        return int(info[-1]["reduction"])
    if hasattr(info, "reduction"):  # timm's FeatureInfo object
        return int(info.reduction()[-1])
    return None


def has_class_token(model: nn.Module) -> bool:
    """A ViT's class token, as the model declares it: prefix tokens alone may be registers
    (``vit_*_reg4_gap_*`` has four and no class token)."""
    if hasattr(model, "has_class_token"):
        return bool(model.has_class_token)
    return getattr(model, "cls_token", None) is not None


def last_stage(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images ``(B, 3, H, W)`` -> (final features in the model's own layout: ``(B, P + N, D)``
    tokens of a ViT, ``(B, D, gh, gw)`` or ``(B, gh, gw, D)`` maps otherwise; last stage
    ``(B, D, gh, gw)``), normalised by the model's final norm as ``forward_features`` would be."""
    final, intermediates = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW")
    return final, intermediates[-1]


def check_grid_is_output(model: nn.Module) -> None:
    """Refuse, for new pretraining (preflight) and in the backbone listing, a model whose output
    is not its last stage: EfficientNet, GhostNet, FastViT end in a head convolution (320 ->
    1280 channels) that the feature grid glsd trains on does not pass through, so its exported
    ``forward_features`` would give untrained features (and the heads, sized from
    ``num_features``, would not fit the grid: no such run ever trained)."""
    num_features = int(getattr(model, "num_features"))
    info = getattr(model, "feature_info", None)
    last = info[-1] if isinstance(info, (list, tuple)) and info else None
    channels = last.get("num_chs") if isinstance(last, dict) else None
    if channels is not None and int(channels) != num_features:
        raise ConfigError(
            f"{type(model).__name__}'s last stage has {channels} channels, but the model ends in a "
            f"head layer to {num_features} that glsd's feature grid does not pass through (it "
            "would stay untrained in the export). Use a backbone whose last stage is its output: "
            "ResNet, ConvNeXt, RegNet, ViT, Swin, MobileNetV3 or glsd_convnet")


class Backbone(nn.Module):
    """Wraps a timm (or glsd) model; ``self.model`` is the plain model that gets exported."""

    def __init__(self, model: nn.Module, global_feature: str = "auto"):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"{type(model).__name__} has no forward_intermediates, so its feature "
                              "grid cannot be read; use a ViT, Swin, ResNet, ConvNeXt or glsd_convnet "
                              "(`glsd backbones PATTERN` lists the ones that work)")
        self.model = model
        self.embed_dim = int(getattr(model, "num_features"))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.layout = declared_layout(model)
        self.stride = declared_stride(model)
        self.has_class_token = self.layout == "tokens" and has_class_token(model)
        if global_feature == "auto":
            global_feature = "cls" if self.has_class_token else "pooled"
        if global_feature == "cls" and not self.has_class_token:
            raise ConfigError("model.global_feature=cls needs a ViT with a class token; this "
                              "backbone has none: set model.global_feature=pooled (or auto)")
        self.global_feature = global_feature

    @torch.no_grad()
    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature grid ``(gh, gw)`` of an input size (one dummy forward in eval mode, so
        BatchNorm statistics are left alone)."""
        was_training = self.training
        self.eval()
        param = next(self.model.parameters())
        x = torch.zeros(1, 3, *image_hw, device=param.device, dtype=param.dtype)
        _, grid = last_stage(self.model, x)
        self.train(was_training)
        return tuple(grid.shape[2:4])

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """images (B, 3, H, W) -> BackboneOutput with local_feat (B, gh, gw, D)."""
        final, grid = last_stage(self.model, images)
        grid = grid.permute(0, 2, 3, 1)
        global_feat = final[:, 0] if self.global_feature == "cls" else grid.mean(dim=(1, 2))
        return BackboneOutput(global_feat, grid)


def create_model(cfg: ModelConfig, image_size: int) -> nn.Module:
    """The bare backbone (timm or glsd) with no classifier; this is what gets exported."""
    from glsd.weights import check_model_size
    from glsd.validation import check_backbone_kwargs

    # Whatever config reaches here (a file's, a checkpoint's, an export's metadata): no file
    # paths or loading options to timm, and no absurd size (measured on the meta device).
    check_backbone_kwargs(cfg.backbone_kwargs)
    check_model_size(lambda: create_model(cfg, image_size), f"model.backbone={cfg.backbone!r}")
    if cfg.backbone != GLSD_CONVNET and cfg.backbone not in timm.list_models():
        close = difflib.get_close_matches(cfg.backbone, [GLSD_CONVNET, *timm.list_models()], n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown backbone model.backbone='{cfg.backbone}'.{hint} "
                          "Any timm model name works, or glsd_convnet.")
    try:
        if cfg.backbone == GLSD_CONVNET:
            return ConvNet(**cfg.backbone_kwargs)
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0,
                                 **timm_kwargs(cfg, image_size))
    # A keyword the model does not take (TypeError), or a value its constructor asserts on
    # (num_heads not dividing embed_dim): the kwargs of the preset's previous backbone, mostly.
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"{cfg.backbone} cannot be built with model.backbone_kwargs="
                          f"{cfg.backbone_kwargs} ({type(e).__name__}: {str(e)[:200]}). When "
                          "switching backbones, reset them: 'model.backbone_kwargs={}'") from None


def timm_kwargs(cfg: ModelConfig, image_size: int) -> dict:
    """The keyword arguments ``timm.create_model(cfg.backbone, ...)`` gets (no num_classes);
    the exported timm folder records them as ``model_args``."""
    kwargs = dict(cfg.backbone_kwargs)
    if is_swin(cfg.backbone):
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("strict_img_size", False)
    elif is_vit(cfg.backbone):  # built for the global crop; any multiple of the patch if it can be
        takes = constructor_parameters(cfg.backbone)
        if "dynamic_img_size" in takes:  # not BEiT or the relative-position ViTs: one size only
            kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("img_size", image_size)
        if cfg.patch_size is not None:
            kwargs.setdefault("patch_size", cfg.patch_size)
    # The families whose runs have always had it: passing it to others (ResNet, RegNet, ...)
    # would add stochastic depth to stored runs on resume. Others keep timm's default in the
    # student; the teacher never has any (models.heads.without_randomness).
    if family(cfg.backbone) in DROP_PATH_FAMILIES:
        kwargs.setdefault("drop_path_rate", cfg.drop_path_rate)
    return kwargs


@functools.lru_cache(maxsize=64)
def constructor_parameters(backbone: str) -> frozenset:
    """The keywords the backbone's model class takes, read from its signature (a name prefix
    cannot tell a ViT that takes ``dynamic_img_size`` from one that does not)."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    names = set()
    for cls in type(model).__mro__:  # a subclass's **kwargs hides its parent's (distilled DeiT)
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return frozenset(names)


def build_backbone(cfg: ModelConfig, image_size: int) -> Backbone:
    return Backbone(create_model(cfg, image_size), cfg.global_feature)


def meta_backbone(cfg: ModelConfig, image_size: int) -> Backbone:
    """The backbone with shapes only (on the meta device): no weights allocated, so checks and
    listings can probe large models in milliseconds."""
    with torch.device("meta"):
        return build_backbone(cfg, image_size).eval()  # eval: BatchNorm takes a 1-image batch


def probe_grid(backbone: Backbone, size: int) -> tuple[int, int]:
    """Grid ``(gh, gw)`` of a ``size`` x ``size`` crop through a meta-device backbone; raises
    whatever the model raises for a size it cannot take."""
    with torch.no_grad():
        _, grid = last_stage(backbone.model, torch.zeros(1, 3, size, size, device="meta"))
    return tuple(grid.shape[2:4])
