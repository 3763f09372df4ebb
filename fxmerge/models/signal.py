"""1-D convolutional networks for signals (audio, sensors): a temporal convolutional network
and a vocoder-style stack of weight-normed dilated convs. Random weights; for tests, demos
and benchmarks of fxmerge on Conv1d."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class _TemporalBlock(nn.Module):
    """Two dilated 3-tap convs with BatchNorm and ReLU, and a residual (1x1 where the
    channels change)."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm1d(cout), nn.ReLU(),
            nn.Conv1d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm1d(cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class TCN1d(nn.Module):
    """A keyword-spotting style TCN: a stem, temporal blocks of growing dilation, a
    strided downsampling conv per stage, global pooling and a linear classifier. Input
    `(batch, channels, samples)`."""

    def __init__(self, in_channels: int = 40, classes: int = 12,
                 widths: tuple[int, ...] = (64, 64, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, widths[0], 3, padding=1, bias=False),
                                   nn.BatchNorm1d(widths[0]), nn.ReLU()]
        cin = widths[0]
        for stage, width in enumerate(widths):
            if stage and width != cin:
                layers += [nn.Conv1d(cin, width, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm1d(width), nn.ReLU()]
            layers += [_TemporalBlock(width, width, 1), _TemporalBlock(width, width, 2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


class _ResStack(nn.Module):
    """HiFi-GAN-style residual stack: (LeakyReLU, dilated conv, LeakyReLU, conv) + x."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(
            nn.LeakyReLU(0.1),
            weight_norm(nn.Conv1d(channels, channels, 3, padding=d, dilation=d)),
            nn.LeakyReLU(0.1),
            weight_norm(nn.Conv1d(channels, channels, 3, padding=1))) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(x)
        return x


class VocoderStack(nn.Module):
    """A vocoder-style Conv1d generator body at one rate: weight-normed convs in residual
    stacks (HiFi-GAN's resblocks, without the transposed upsampling). Input `(batch,
    mels, frames)`, output `(batch, 1, frames)`."""

    def __init__(self, mels: int = 80, channels: int = 64, stacks: int = 2) -> None:
        super().__init__()
        self.pre = weight_norm(nn.Conv1d(mels, channels, 7, padding=3))
        self.stacks = nn.Sequential(*(_ResStack(channels) for _ in range(stacks)))
        self.post = nn.Sequential(nn.LeakyReLU(0.1),
                                  weight_norm(nn.Conv1d(channels, 1, 7, padding=3)), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.stacks(self.pre(x)))
