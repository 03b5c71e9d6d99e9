"""Backbones with one uniform output: a global embedding and a grid of local features.

Any timm model works through ``forward_features``; what differs is the layout of its output:
tokens with prefix (ViT: ``(B, P + H*W, D)``), channels-last maps (Swin: ``(B, H, W, D)``) or
channels-first maps (ResNet, the small conv net: ``(B, D, H, W)``). The layout is detected
once at construction by a dummy forward, so ``forward`` has no guessing in it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch
from torch import nn

from glsd.config import ConfigError, ModelConfig
from glsd.models.convnet import ConvNet


@dataclass
class BackboneOutput:
    global_feat: torch.Tensor  # (B, D): CLS token or mean-pooled local features
    local_feat: torch.Tensor  # (B, H, W, D): one feature per grid cell, row-major


class Backbone(nn.Module):
    """Wraps a timm (or glsd) model; ``self.model`` is the plain model that gets exported."""

    def __init__(self, model: nn.Module, global_feature: str = "auto", probe_size: int = 32):
        super().__init__()
        self.model = model
        self.embed_dim = int(getattr(model, "num_features"))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.layout = self._detect_layout(probe_size)
        if global_feature == "auto":
            global_feature = "cls" if self.layout == "tokens" and self.num_prefix_tokens > 0 else "pooled"
        if global_feature == "cls" and not (self.layout == "tokens" and self.num_prefix_tokens > 0):
            raise ConfigError("model.global_feature=cls needs a ViT with a class token; use pooled")
        self.global_feature = global_feature

    @torch.no_grad()
    def _detect_layout(self, size: int) -> str:
        was_training = self.model.training
        self.model.eval()
        out = self.model.forward_features(torch.zeros(1, 3, size, size))
        self.model.train(was_training)
        if out.ndim == 3:
            return "tokens"
        if out.ndim == 4 and out.shape[-1] == self.embed_dim and out.shape[1] != self.embed_dim:
            return "nhwc"
        if out.ndim == 4 and out.shape[1] == self.embed_dim:
            return "nchw"
        raise ConfigError(f"cannot read a feature grid from {type(self.model).__name__} output "
                          f"of shape {tuple(out.shape)}; use a ViT, Swin, ResNet or conv backbone")

    @torch.no_grad()
    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature grid ``(gh, gw)`` of an input size (one dummy forward in eval mode, so
        BatchNorm statistics are left alone)."""
        was_training = self.training
        self.eval()
        param = next(self.model.parameters())
        x = torch.zeros(1, 3, *image_hw, device=param.device, dtype=param.dtype)
        grid = self._to_grid(self.model.forward_features(x), image_hw)
        self.train(was_training)
        return tuple(grid.shape[1:3])

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """images (B, 3, H, W) -> BackboneOutput with local_feat (B, gh, gw, D)."""
        out = self.model.forward_features(images)
        grid = self._to_grid(out, images.shape[-2:])
        if self.global_feature == "cls":
            global_feat = out[:, 0]
        else:
            global_feat = grid.mean(dim=(1, 2))
        return BackboneOutput(global_feat, grid)

    def _to_grid(self, out: torch.Tensor, image_hw) -> torch.Tensor:
        if self.layout == "nhwc":
            return out
        if self.layout == "nchw":
            return out.permute(0, 2, 3, 1)
        tokens = out[:, self.num_prefix_tokens:]
        gh, gw = self._token_grid(image_hw, tokens.shape[1])
        return tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1])

    def _token_grid(self, image_hw, n_tokens: int) -> tuple[int, int]:
        embed = getattr(self.model, "patch_embed", None)
        if embed is not None and hasattr(embed, "dynamic_feat_size"):
            gh, gw = embed.dynamic_feat_size(tuple(int(s) for s in image_hw))
        else:
            gh = gw = int(round(n_tokens ** 0.5))
        if gh * gw != n_tokens:
            raise RuntimeError(f"{n_tokens} tokens do not form a {gh}x{gw} grid")
        return int(gh), int(gw)


def create_model(cfg: ModelConfig, image_size: int) -> nn.Module:
    """The bare backbone (timm or glsd) with no classifier; this is what gets exported."""
    kwargs = dict(cfg.backbone_kwargs)
    if cfg.backbone.startswith("glsd_convnet"):
        return ConvNet(**kwargs)
    if cfg.backbone not in timm.list_models():
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown backbone model.backbone='{cfg.backbone}'.{hint} "
                          "Any timm model name works, or glsd_convnet.")
    try:
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0,
                                 **timm_kwargs(cfg, image_size))
    except TypeError as e:
        raise ConfigError(f"{cfg.backbone} does not accept model.backbone_kwargs="
                          f"{cfg.backbone_kwargs} ({e}). When switching backbones, reset them: "
                          "'model.backbone_kwargs={}'") from None


def timm_kwargs(cfg: ModelConfig, image_size: int) -> dict:
    """The keyword arguments ``timm.create_model(cfg.backbone, ...)`` gets (no num_classes);
    the exported timm folder records them as ``model_args``."""
    kwargs = dict(cfg.backbone_kwargs)
    family = cfg.backbone.split("_")[0]
    if family in ("vit", "deit", "deit3", "eva", "beit"):
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("img_size", image_size)
        if cfg.patch_size is not None:
            kwargs.setdefault("patch_size", cfg.patch_size)
    elif family in ("swin", "swinv2"):
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("strict_img_size", False)
    if family in ("vit", "deit", "deit3", "eva", "beit", "swin", "swinv2", "resnet", "resnetv2", "convnext"):
        # Always pass it, 0 included: timm's own default (0.1 for Swin) would otherwise leak
        # stochastic depth into the teacher.
        kwargs.setdefault("drop_path_rate", cfg.drop_path_rate)
    return kwargs


def build_backbone(cfg: ModelConfig, image_size: int) -> Backbone:
    return Backbone(create_model(cfg, image_size), cfg.global_feature, probe_size=image_size)
