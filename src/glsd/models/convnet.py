"""A small conv net for CPU-scale pretraining on 32 px images.

Six 3x3 conv + BatchNorm + ReLU layers with two 2x2 poolings: on a 32 px crop the last map is
8x8 (a 4x4 grid for 16 px crops). On this project's 2-core CPU it learns in a few hundred
steps where a ViT of similar cost stays at its random-init k-NN floor (method notes).
It declares what timm models declare (``num_features``, ``feature_info`` with each stage's
reduction, ``forward_features``, ``forward_intermediates``), so the rest of the code treats it
as any timm model.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.models._features import feature_take_indices
from torch import nn


class ConvNet(nn.Module):
    output_fmt = "NCHW"

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128),
                 pool_after: tuple[int, ...] = (1, 3), in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        # A stage is a run of layers at one resolution: its output (before the pooling that
        # ends it, or the net's output for the last one) is an intermediate.
        self._stage_ends: list[int] = []
        self.feature_info: list[dict] = []
        prev, reduction = in_chans, 1
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in pool_after:
                if i < len(widths) - 1:
                    self._add_stage(len(layers) - 1, width, reduction)
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
            prev = width
        self._add_stage(len(layers) - 1, prev, reduction)
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _add_stage(self, end: int, channels: int, reduction: int) -> None:
        self._stage_ends.append(end)
        self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"features.{end}"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/r, W/r), r = feature_info[-1]["reduction"]."""
        return self.features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's contract: (final features, [stage outputs (B, C, H/r, W/r)]) for the stages
        ``indices`` picks (an int: the last n; None: all). ``norm`` is accepted for the
        interface: this net has no final norm."""
        if output_fmt != "NCHW":
            raise ValueError("ConvNet.forward_intermediates: output_fmt must be NCHW")
        take, max_index = feature_take_indices(len(self._stage_ends), indices)
        last_layer = self._stage_ends[max_index] if stop_early or intermediates_only else len(self.features) - 1
        intermediates = []
        for i, layer in enumerate(self.features[:last_layer + 1]):
            x = layer(x)
            if i in self._stage_ends and self._stage_ends.index(i) in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward(self, x):
        return self.forward_features(x).mean(dim=(2, 3))
