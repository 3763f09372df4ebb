"""Small models used across the tests."""

import torch
from torch import nn


class TinyUNet(nn.Module):
    """A U-Net-style network: a skip by concatenation, an upsample, pooling."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc1(x)
        m = self.up(self.mid(self.pool(e)))
        return self.dec(torch.cat([e, m], dim=1))


class DataDependent(nn.Module):
    """Cannot be symbolically traced: control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_unit(c_in: int, c_out: int, k: int, stride: int = 1, act: bool = True,
              depthwise: bool = False) -> list[nn.Module]:
    groups = c_in if depthwise and c_in == c_out else 1
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    return layers + ([nn.ReLU()] if act else [])


def small_net(spec: list[tuple]) -> nn.Sequential:
    """A chain from `spec`: ("conv", c_out, k, stride, act, dw) or ("res", [conv specs])."""
    layers, c = [], 3
    for item in spec:
        if item[0] == "conv":
            _, c_out, k, stride, act, dw = item
            layers += conv_unit(c, c_out, k, stride, act, dw)
            c = c_out
        else:
            body = [m for _, k, dw in item[1] for m in conv_unit(c, c, k, 1, True, dw)]
            layers.append(Residual(nn.Sequential(*body[:-1])))  # add before the last act
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
