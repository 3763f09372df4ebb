"""Pure tensor maths for exact merging: affine convolutions, composed, folded and summed.

An `AffineConv` is `y = convNd(x, weight, bias, stride, padding, dilation, groups) + sum_k
A_k c_k` over 1, 2 or 3 spatial dimensions (the weight's rank says which; kernel, stride,
padding and dilation are per axis: R(2+1)D's `1x3x3` then `3x1x1` compose into a `3x3x3`),
kept in the native form of a convolution: grouped weights stay grouped and dilated kernels
stay dilated, so a conv the plan leaves alone is never expanded, and a composition
is only as large as the maths requires (docs/method.md §4). The padding may be negative while
a chain is being built (a crop). Conditioning terms are vectors `c_k` (a time embedding, one
per sample) added over the whole map somewhere in the chain, carried through later convs as
`A_k` (exact once those convs pad nothing, because a conv of a constant map is the sum of
its taps times it). Every function that materialises a kernel knows its size first and
refuses one over `max_bytes`. Everything here works in the weight's dtype; callers use
float64 for exactness.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeError
from .sides import Sides, label, per_axis


@dataclass(frozen=True)
class AffineConv:
    weight: torch.Tensor  # (out, in / groups, *kernel): the taps, `dilation` apart
    bias: torch.Tensor  # (out,)
    stride: Sides = 1  # each of these three is one per axis once built (an int: every axis)
    padding: Sides = 0
    groups: int = 1
    dilation: Sides = 1
    is_identity: bool = False  # exactly the identity (1x1, stride 1, no bias), maybe padded
    conditions: tuple[tuple[object, torch.Tensor], ...] = ()  # (key of c_k, A_k (out, dim))

    def __post_init__(self) -> None:
        for name in ("stride", "padding", "dilation"):
            object.__setattr__(self, name, per_axis(getattr(self, name), self.rank))

    @property
    def rank(self) -> int:
        """Spatial dimensions: 1, 2 or 3."""
        return self.weight.dim() - 2

    @property
    def kernel(self) -> tuple[int, ...]:
        """Taps per axis (the native kernel size)."""
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Pixels per axis the kernel spans: `(kernel - 1) * dilation + 1`."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply it (a negative padding crops the input first)."""
        crop = [max(-p, 0) for p in self.padding]
        if any(crop):
            x = x[(..., *(slice(c, n - c) for c, n in zip(crop, x.shape[-self.rank:])))]
        return CONV_FUNCTIONS[self.rank](x, self.weight, self.bias, self.stride,
                                         [max(p, 0) for p in self.padding], self.dilation,
                                         self.groups)


CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by spatial rank
CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _format_bytes(n: int) -> str:
    """`n` bytes for a person: MiB from 1 MiB up, else bytes."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _check_size(shape: tuple[int, ...], itemsize: int, max_bytes: int | None,
                what: str) -> None:
    size = math.prod(shape) * itemsize
    if max_bytes is not None and size > max_bytes:
        raise MergeError(f"{what} would be a {'x'.join(map(str, shape))} kernel of "
                         f"{_format_bytes(size)}, over the limit of {_format_bytes(max_bytes)} "
                         "(max_kernel_bytes)")


def _regroup(weight: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """A weight of `groups` groups written with `to` groups (`to` divides `groups`): each
    new group is block-diagonal in the old groups it holds."""
    if groups == to:
        return weight
    out_ch, in_per_group, *kernel = weight.shape
    n = groups // to  # old groups per new group
    blocks = weight.reshape(to, n, out_ch // groups, in_per_group, *kernel)
    dense = weight.new_zeros(to, n, out_ch // groups, n, in_per_group, *kernel)
    g = torch.arange(n)
    dense[:, g, :, g] = blocks.transpose(0, 1)
    return dense.reshape(out_ch, n * in_per_group, *kernel)


def _spread(weight: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Taps `factors` apart, one factor per axis: zeros between them (a dilation written
    out). An axis of one tap has none to spread."""
    factors = [f if k > 1 else 1 for f, k in zip(factors, weight.shape[2:])]
    if all(f == 1 for f in factors):
        return weight
    out = weight.new_zeros(*weight.shape[:2],
                           *[(k - 1) * f + 1 for k, f in zip(weight.shape[2:], factors)])
    out[(..., *[slice(None, None, f) for f in factors])] = weight
    return out


def _at(offset: Sequence[int], size: Sequence[int]) -> tuple:
    """The index of a `size` box at `offset` in a kernel's last dimensions."""
    return (..., *(slice(o, o + n) for o, n in zip(offset, size)))


def _steps(a: AffineConv) -> tuple[int, ...]:
    """The pixels between taps per axis, 0 on an axis of one tap (which fits any lattice)."""
    return tuple(d if k > 1 else 0 for k, d in zip(a.kernel, a.dilation))


def _grouped_matmul(m: torch.Tensor, groups: int, v: torch.Tensor) -> torch.Tensor:
    """`dense(m) @ v` for `m` `(out, in / groups)` block-diagonal in `groups` and `v`
    `(in, ...)`, without expanding `m`."""
    out_ch, in_per_group = m.shape
    rest = v.shape[1:]
    prod = torch.bmm(m.reshape(groups, out_ch // groups, in_per_group),
                     v.reshape(groups, in_per_group, -1))
    return prod.reshape(out_ch, *rest)


def from_conv(conv: nn.Module, dtype: torch.dtype = torch.float64) -> AffineConv:
    """The affine map of an `nn.Conv1d/2d/3d` (zero padding), in its own form: its kernel,
    groups, and its dilation, stride and padding per axis."""
    weight = conv.weight.detach().to(dtype)
    bias = (conv.bias.detach().to(dtype) if conv.bias is not None
            else weight.new_zeros(conv.out_channels))
    return AffineConv(weight, bias, tuple(conv.stride), tuple(conv.padding), conv.groups,
                      tuple(conv.dilation))


def identity(channels: int, dtype: torch.dtype = torch.float64, rank: int = 2) -> AffineConv:
    """The identity as a depthwise 1x1 conv of weight 1, over `rank` spatial dimensions."""
    return AffineConv(torch.ones(channels, 1, *[1] * rank, dtype=dtype),
                      torch.zeros(channels, dtype=dtype), groups=channels, is_identity=True)


def bn_scale_shift(bn: nn.Module, dtype: torch.dtype = torch.float64):
    """Eval-mode BatchNorm as `x * scale + shift` per channel; reads the module's eps."""
    if bn.running_mean is None or bn.running_var is None:
        raise MergeError(f"BatchNorm {bn} has no running statistics to fold")
    std = torch.sqrt(bn.running_var.detach().to(dtype) + bn.eps)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.detach().to(dtype) * scale


def scale_shift(a: AffineConv, scale: torch.Tensor, shift: torch.Tensor) -> AffineConv:
    """`a(x) * scale + shift`, one value of each per channel, as one affine conv."""
    return replace(a, weight=a.weight * scale.reshape(-1, *[1] * (a.weight.dim() - 1)),
                   bias=a.bias * scale + shift, is_identity=False,
                   conditions=tuple((k, m * scale[:, None]) for k, m in a.conditions))


def fold_bn(a: AffineConv, bn: nn.Module) -> AffineConv:
    """`bn(a(x))` as one affine conv (BN in eval mode)."""
    return scale_shift(a, *bn_scale_shift(bn, a.weight.dtype))


def add_condition(a: AffineConv, key: object) -> AffineConv:
    """`a(x) + c`, with `c` (named by `key`) one vector per sample over the whole map."""
    eye = torch.eye(a.out_channels, dtype=a.weight.dtype)
    return replace(a, is_identity=False, conditions=(*a.conditions, (key, eye)))


def compose(first: AffineConv, second: AffineConv, max_bytes: int | None = None
            ) -> AffineConv:
    """`second(first(x))` as one conv. Unless `first` is the identity, `second` must have no
    padding of its own (the prune pass moves a block's padding to its first conv, which is
    what keeps this exact); a negative one, a crop, is a crop of `first`'s output.

    On each axis the merged kernel spans `extent1 + (extent2 - 1) * s1` pixels: the second
    kernel's taps sit `s1 * dilation2` apart, so a strided first conv composes exactly. Its
    taps lie on the coarsest lattice holding both kernels' taps (the gcd of those two steps:
    a dilation shared by both convs stays a dilation), and it has the groups both convs
    share (the gcd of their groups; equal groups stay grouped, depthwise stays depthwise).
    """
    if first.rank != second.rank:
        raise MergeError(f"cannot compose a {first.rank}-D conv with a {second.rank}-D one")
    if any(p < 0 for p in second.padding):  # the second conv crops its input: first's output
        first = crop_output(first, [max(-p, 0) for p in second.padding])
        second = replace(second, padding=[max(p, 0) for p in second.padding])
    if first.is_identity and all(p1 >= 0 or p2 == 0
                                 for p1, p2 in zip(first.padding, second.padding)):
        # zero-pad (or crop) then conv: a single padding
        return replace(second, padding=[p1 + p2 for p1, p2 in zip(first.padding,
                                                                   second.padding)],
                       is_identity=False)
    if any(second.padding):
        raise MergeError(
            f"cannot compose: the second conv pads by {label(second.padding)}; move the "
            "padding of a block to its first conv (fxmerge.prune does) before merging")
    if first.out_channels != second.in_channels:
        raise MergeError(f"channel mismatch {first.out_channels} -> {second.in_channels}")
    s = first.stride
    step = [math.gcd(a, b * c) or 1 for a, b, c in zip(_steps(first), s, _steps(second))]
    groups = math.gcd(first.groups, second.groups)
    size = [(e1 - 1 + (e2 - 1) * si) // st + 1
            for e1, e2, si, st in zip(first.extent, second.extent, s, step)]
    k1 = [(e1 - 1) // st + 1 for e1, st in zip(first.extent, step)]  # first's taps, merged
    in_per_group = first.in_channels // groups
    itemsize = first.weight.element_size()
    _check_size((second.out_channels, in_per_group, *size), itemsize, max_bytes,
                "the composed conv")
    _check_size((first.out_channels, in_per_group, *k1), itemsize, max_bytes,
                "the first conv, re-grouped")
    inner = _spread(_regroup(first.weight, first.groups, groups),
                    [d // st for d, st in zip(first.dilation, step)])
    flat = inner.reshape(first.out_channels, -1)
    pitch = [si * d2 // st for si, d2, st in zip(s, second.dilation, step)]
    weight = inner.new_zeros(second.out_channels, in_per_group, *size)
    for u in itertools.product(*map(range, second.kernel)):  # each tap of the second
        tap = _grouped_matmul(second.weight[(..., *u)], second.groups, flat)
        weight[_at([p * t for p, t in zip(pitch, u)], k1)] += tap.reshape(-1, in_per_group,
                                                                            *k1)
    taps = second.weight.sum(dim=tuple(range(2, 2 + first.rank)))
    return AffineConv(
        weight, _grouped_matmul(taps, second.groups, first.bias) + second.bias,
        [a * b for a, b in zip(first.stride, second.stride)], first.padding, groups, step,
        conditions=tuple((k, _grouped_matmul(taps, second.groups, m))
                         for k, m in first.conditions))


def crop_output(a: AffineConv, amount: Sides | Sequence[int]) -> AffineConv:
    """`a(x)` with `amount` pixels (per axis, or one for all) removed on each side; a
    negative amount pads with zeros, which only the identity can absorb exactly."""
    amount = per_axis(amount, a.rank)
    if any(n < 0 for n in amount) and not a.is_identity:
        raise MergeError(f"zero-padding the output of a non-identity conv by "
                         f"{label([-n for n in amount])} is not a convolution")
    return replace(a, padding=[p - n * s for p, n, s in zip(a.padding, amount, a.stride)])


def add(a: AffineConv, b: AffineConv, max_bytes: int | None = None) -> AffineConv:
    """`a(x) + b(x)` as one conv: both kernels placed on one grid, with the groups and tap
    lattice both share. This is how a skip connection (identity, or a folded 1x1
    projection) is fused into a merged conv, and how a region's branches become one."""
    if a.rank != b.rank:
        raise MergeError(f"cannot fuse an add of a {a.rank}-D and a {b.rank}-D path")
    if a.stride != b.stride:
        raise MergeError(f"cannot fuse an add of stride {label(a.stride)} and stride "
                         f"{label(b.stride)} paths")
    reach_a = [e - 1 - 2 * p for e, p in zip(a.extent, a.padding)]
    reach_b = [e - 1 - 2 * p for e, p in zip(b.extent, b.padding)]
    if reach_a != reach_b:
        raise MergeError("cannot fuse an add whose two paths are not centred on one grid")
    pad = [max(p, q) for p, q in zip(a.padding, b.padding)]
    step = [math.gcd(sa, sb, p - pa, p - pb) or 1 for sa, sb, p, pa, pb
            in zip(_steps(a), _steps(b), pad, a.padding, b.padding)]
    groups = math.gcd(a.groups, b.groups)
    size = [(r + 2 * p) // st + 1 for r, p, st in zip(reach_a, pad, step)]
    shape = (a.out_channels, a.in_channels // groups, *size)
    _check_size(shape, a.weight.element_size(), max_bytes, "the fused add")
    weight = a.weight.new_zeros(shape)
    for part in (a, b):
        w = _spread(_regroup(part.weight, part.groups, groups),
                    [d // st for d, st in zip(part.dilation, step)])
        weight[_at([(p - pp) // st for p, pp, st in zip(pad, part.padding, step)],
                   w.shape[2:])] += w
    return AffineConv(weight, a.bias + b.bias, a.stride, pad, groups, step,
                      conditions=a.conditions + b.conditions)


def to_conv(a: AffineConv, dtype: torch.dtype, device: torch.device | None = None
            ) -> nn.Module:
    """An `nn.Conv1d/2d/3d` computing `a` without its conditioning terms (see
    `condition_conv`), with `a`'s groups and dilation; its weights are never initialised,
    only assigned."""
    if any(p < 0 for p in a.padding):
        raise MergeError(f"merged conv would need negative padding {label(a.padding)}")
    conv = CONV_MODULES[a.rank](a.in_channels, a.out_channels, a.kernel, a.stride, a.padding,
                     dilation=a.dilation, groups=a.groups, bias=True, device="meta")
    conv.weight = nn.Parameter(a.weight.to(dtype=dtype, device=device).contiguous())
    conv.bias = nn.Parameter(a.bias.to(dtype=dtype, device=device))
    return conv


def condition_conv(matrix: torch.Tensor, dtype: torch.dtype,
                   device: torch.device | None = None, rank: int = 2) -> nn.Module:
    """The 1x1 conv that maps a conditioning vector `(B, dim, 1, ...)` to its term `A c`."""
    conv = CONV_MODULES[rank](matrix.shape[1], matrix.shape[0], 1, bias=False, device="meta")
    conv.weight = nn.Parameter(matrix.reshape(*matrix.shape, *[1] * rank)
                               .to(dtype=dtype, device=device).contiguous())
    return conv
