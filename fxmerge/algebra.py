"""Pure tensor maths for exact merging: affine convolutions, composed, folded and summed.

An `AffineConv` is `y = conv2d(x, weight, bias, stride, padding) + sum_k A_k c_k` with a
dense weight (groups expanded), a padding that may be negative while a chain is being built
(a crop), and conditioning terms: vectors `c_k` (a time embedding, one per sample) added over
the whole map somewhere in the chain, carried through later convs as `A_k` (exact once those
convs pad nothing, because a conv of a constant map is the sum of its taps times it).
Everything here works in the weight's dtype; callers use float64 for exactness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeError


@dataclass(frozen=True)
class AffineConv:
    weight: torch.Tensor  # (out, in, k, k), dense
    bias: torch.Tensor  # (out,)
    stride: int = 1
    padding: int = 0
    is_identity: bool = False  # exactly the identity (1x1, stride 1, no bias), maybe padded
    conditions: tuple[tuple[object, torch.Tensor], ...] = ()  # (key of c_k, A_k (out, dim))

    @property
    def kernel(self) -> int:
        return self.weight.shape[-1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply it (negative padding crops the input first)."""
        if self.padding < 0:
            c = -self.padding
            x = x[..., c:x.shape[-2] - c, c:x.shape[-1] - c]
        return F.conv2d(x, self.weight, self.bias, self.stride, max(self.padding, 0))

def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand a grouped conv weight `(out, in/groups, k, k)` to a block-diagonal dense one."""
    if groups == 1:
        return weight
    out_ch, in_per_group, *kernel = weight.shape
    blocks = weight.reshape(groups, out_ch // groups, in_per_group, *kernel)
    dense = weight.new_zeros(groups, out_ch // groups, groups, in_per_group, *kernel)
    g = torch.arange(groups)
    dense[g, :, g] = blocks
    return dense.reshape(out_ch, groups * in_per_group, *kernel)


def dilate_weight(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The equivalent undilated kernel: zeros between the taps."""
    if dilation == 1:
        return weight
    k = weight.shape[-1]
    size = (k - 1) * dilation + 1
    out = weight.new_zeros(*weight.shape[:2], size, size)
    out[..., ::dilation, ::dilation] = weight
    return out


def from_conv(conv: nn.Conv2d, dtype: torch.dtype = torch.float64) -> AffineConv:
    """The affine map of an `nn.Conv2d` (square, zero padding)."""
    weight = dilate_weight(dense_weight(conv.weight.detach().to(dtype), conv.groups),
                           conv.dilation[0])
    bias = (conv.bias.detach().to(dtype) if conv.bias is not None
            else weight.new_zeros(conv.out_channels))
    return AffineConv(weight, bias, conv.stride[0], conv.padding[0])


def identity(channels: int, dtype: torch.dtype = torch.float64) -> AffineConv:
    """The identity as a 1x1 conv."""
    weight = torch.eye(channels, dtype=dtype)[:, :, None, None]
    return AffineConv(weight, torch.zeros(channels, dtype=dtype), is_identity=True)


def bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype = torch.float64):
    """Eval-mode BatchNorm as `x * scale + shift` per channel; reads the module's eps."""
    if bn.running_mean is None or bn.running_var is None:
        raise MergeError(f"BatchNorm {bn} has no running statistics to fold")
    std = torch.sqrt(bn.running_var.detach().to(dtype) + bn.eps)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.detach().to(dtype) * scale


def fold_bn(a: AffineConv, bn: nn.BatchNorm2d) -> AffineConv:
    """`bn(a(x))` as one affine conv (BN in eval mode)."""
    scale, shift = bn_scale_shift(bn, a.weight.dtype)
    return AffineConv(a.weight * scale[:, None, None, None], a.bias * scale + shift,
                      a.stride, a.padding,
                      conditions=tuple((k, m * scale[:, None]) for k, m in a.conditions))


def add_condition(a: AffineConv, key: object) -> AffineConv:
    """`a(x) + c`, with `c` (named by `key`) one vector per sample over the whole map."""
    eye = torch.eye(a.out_channels, dtype=a.weight.dtype)
    return AffineConv(a.weight, a.bias, a.stride, a.padding,
                      conditions=(*a.conditions, (key, eye)))


def compose(first: AffineConv, second: AffineConv) -> AffineConv:
    """`second(first(x))` as one conv. Unless `first` is the identity, `second` must have no
    padding of its own (the prune pass moves a block's padding to its first conv, which is
    what keeps this exact).

    The merged kernel is `(k2 - 1) * s1 + k1` wide: the second kernel is dilated by the
    first stride, so a strided first conv is composed exactly.
    """
    if first.is_identity and (first.padding >= 0 or second.padding == 0):
        # zero-pad (or crop) then conv: a single padding
        return AffineConv(second.weight, second.bias, second.stride,
                          second.padding + first.padding)
    if second.padding != 0:
        raise MergeError(
            f"cannot compose: the second conv pads by {second.padding}; move the padding of a "
            "block to its first conv (fxmerge.prune does) before merging")
    if first.out_channels != second.in_channels:
        raise MergeError(f"channel mismatch {first.out_channels} -> {second.in_channels}")
    s, k1, k2 = first.stride, first.kernel, second.kernel
    size = (k2 - 1) * s + k1
    weight = first.weight.new_zeros(second.out_channels, first.in_channels, size, size)
    flat = first.weight.reshape(first.out_channels, -1)
    for uy in range(k2):
        for ux in range(k2):
            tap = (second.weight[:, :, uy, ux] @ flat).view(weight.shape[0], -1, k1, k1)
            weight[:, :, s * uy:s * uy + k1, s * ux:s * ux + k1] += tap
    taps = second.weight.sum(dim=(2, 3))
    bias = taps @ first.bias + second.bias
    return AffineConv(weight, bias, first.stride * second.stride, first.padding,
                      conditions=tuple((k, taps @ m) for k, m in first.conditions))


def crop_output(a: AffineConv, amount: int) -> AffineConv:
    """`a(x)` with `amount` pixels removed on each side (negative `amount` pads with zeros,
    which only the identity can absorb exactly)."""
    if amount < 0 and not a.is_identity:
        raise MergeError(
            f"zero-padding the output of a non-identity conv by {-amount} is not a convolution")
    return AffineConv(a.weight, a.bias, a.stride, a.padding - amount * a.stride, a.is_identity,
                      a.conditions)


def add(a: AffineConv, b: AffineConv) -> AffineConv:
    """`a(x) + b(x)` as one conv: both kernels placed on one grid. This is how a skip
    connection (identity, or a folded 1x1 projection) is fused into a merged conv."""
    if a.stride != b.stride:
        raise MergeError(f"cannot fuse an add of stride {a.stride} and stride {b.stride} paths")
    reach_a = a.kernel - 1 - 2 * a.padding
    reach_b = b.kernel - 1 - 2 * b.padding
    if reach_a != reach_b:
        raise MergeError("cannot fuse an add whose two paths are not centred on one grid")
    pad = max(a.padding, b.padding)
    size = reach_a + 2 * pad + 1
    weight = a.weight.new_zeros(a.out_channels, a.in_channels, size, size)
    for part in (a, b):
        o = pad - part.padding
        weight[:, :, o:o + part.kernel, o:o + part.kernel] += part.weight
    return AffineConv(weight, a.bias + b.bias, a.stride, pad,
                      conditions=a.conditions + b.conditions)


def regroup(a: AffineConv) -> tuple[torch.Tensor, int]:
    """The weight in grouped form: depthwise when the dense weight is diagonal, else dense."""
    w = a.weight
    if w.shape[0] == w.shape[1] and w.shape[0] > 1:
        off_diagonal = w * (1 - torch.eye(w.shape[0], dtype=w.dtype))[:, :, None, None]
        if not off_diagonal.any():
            idx = torch.arange(w.shape[0])
            return w[idx, idx].unsqueeze(1), w.shape[0]
    return w, 1


def to_conv(a: AffineConv, dtype: torch.dtype, device: torch.device | None = None) -> nn.Conv2d:
    """An `nn.Conv2d` computing `a` without its conditioning terms (see
    `condition_conv`), re-grouped to depthwise when possible."""
    if a.padding < 0:
        raise MergeError(f"merged conv would need negative padding {a.padding}")
    weight, groups = regroup(a)
    conv = nn.Conv2d(a.in_channels, a.out_channels, a.kernel, a.stride, a.padding,
                     groups=groups, bias=True)
    conv.weight.data = weight.to(dtype=dtype, device=device).contiguous()
    conv.bias.data = a.bias.to(dtype=dtype, device=device)
    return conv


def condition_conv(matrix: torch.Tensor, dtype: torch.dtype,
                   device: torch.device | None = None) -> nn.Conv2d:
    """The 1x1 conv that maps a conditioning vector `(B, dim, 1, 1)` to its term `A c`."""
    conv = nn.Conv2d(matrix.shape[1], matrix.shape[0], 1, bias=False)
    conv.weight.data = matrix[:, :, None, None].to(dtype=dtype, device=device).contiguous()
    return conv
