"""A small conv net for CPU-scale pretraining on 32 px images.

Six 3x3 conv + BatchNorm + ReLU layers with two 2x2 poolings: on a 32 px crop the last map is
8x8 (a 4x4 grid for 16 px crops). On this project's 2-core CPU it learns in a few hundred
steps where a ViT of similar cost stays at its random-init k-NN floor (method notes).
It follows timm's interface (``num_features``, ``forward_features``) so the rest of the
code treats it as any timm model.
"""
from __future__ import annotations

from torch import nn


class ConvNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128),
                 pool_after: tuple[int, ...] = (1, 3), in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        """(B, 3, H, W) -> (B, D, H/4, W/4)."""
        return self.features(x)

    def forward(self, x):
        return self.forward_features(x).mean(dim=(2, 3))
