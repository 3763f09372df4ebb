"""The DDPM U-Net of Ho et al. (2020) in its CIFAR-10 configuration, as the LayerMerge
authors compress it: ResNet blocks with a time-embedding add between their two 3x3 convs,
GroupNorm(32) and swish, self-attention at 16x16, skips by concatenation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Kept out of the search, as the authors do: attention's 1x1 convs, the 1x1 shortcuts, and
# the output conv.
DDPM_EXCLUDE = ("*attn*", "*.shortcut", "conv_out")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps `(B,)` -> `(B, dim)`."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv1 -> + time projection -> norm -> swish -> dropout -> conv2,
    plus the input (through a 1x1 shortcut when the channels change)."""

    def __init__(self, c_in: int, c_out: int, temb: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hgt * wid).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hgt * wid)
        v = self.v(h).reshape(b, c, hgt * wid)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResNet blocks of one resolution, their attention, and the resampling conv."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()


class DDPMUNet(nn.Module):
    """`forward(x, t)`: the predicted noise for images `x` at integer timesteps `t` `(B,)`.

    Defaults are the CIFAR-10 model (35.7 M parameters); smaller settings keep the same block
    structure (the demo trains one on 16x16 digits)."""

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.1, resolution: int = 32, in_channels: int = 3,
                 groups: int = 32) -> None:
        super().__init__()
        self.ch, temb = ch, 4 * ch
        self.temb_dense0, self.temb_dense1 = nn.Linear(ch, temb), nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips, c, res = [ch], ch, resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c, ch * mult, temb, dropout, groups))
                c = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c, groups))
                skips.append(c)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c)
                res //= 2
                skips.append(c)
            self.down.append(level)
        self.mid_block_1 = ResnetBlock(c, c, temb, dropout, groups)
        self.mid_attn = AttnBlock(c, groups)
        self.mid_block_2 = ResnetBlock(c, c, temb, dropout, groups)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c + skips.pop(), ch * mult, temb, dropout,
                                               groups))
                c = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c, groups))
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            self.up.insert(0, level)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.ch)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        hs = [self.conv_in(x)]
        for level in self.down:
            for n, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[n](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid_block_2(self.mid_attn(self.mid_block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for n, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[n](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
