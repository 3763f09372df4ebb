"""A small MobileNetV2-style network for the demo (1-channel 32x32 digits)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (no activation), with a skip when the
    shape allows, as in MobileNetV2."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   conv_bn(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class DemoMobileNetV2(nn.Module):
    """Stem, 8 inverted residual blocks (t, c, n, s as in MobileNetV2, narrower), head."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 48, 2, 2))
    EXCLUDE = ("stem.0", "head.0")  # stem and last 1x1 conv stay, as in the paper

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3)
        blocks, c = [], 16
        for t, c_out, n, s in self.SETTINGS:
            for idx in range(n):
                blocks.append(InvertedResidual(c, c_out, s if idx == 0 else 1, t))
                c = c_out
        self.features = nn.Sequential(*blocks)
        self.head = conv_bn(c, 128, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.features(self.stem(x))))
        return self.classifier(torch.flatten(x, 1))
