"""Per-axis sizes of a convolution (kernel, stride, padding, dilation), as records keep them:
one int where every spatial axis agrees (`nn.Conv2d(kernel_size=3)`), else a tuple of one
per axis, first to last (R(2+1)D's `(1, 3, 3)`)."""

from __future__ import annotations

from collections.abc import Sequence

Sides = int | tuple[int, ...]


def per_axis(value: Sides | Sequence[int], rank: int) -> tuple[int, ...]:
    """`value` as one int per spatial axis."""
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{value} has {len(value)} sides, not {rank}")
    return value


def compact(values: Sequence[int]) -> Sides:
    """The int every axis shares, or the tuple where they differ."""
    values = tuple(int(v) for v in values)
    return values[0] if len(set(values)) == 1 else values


def largest(value: Sides) -> int:
    """The largest side."""
    return value if isinstance(value, int) else max(value)


def label(value: Sides | Sequence[int]) -> str:
    """`3`, or `1x3x3` where the axes differ."""
    value = value if isinstance(value, int) else compact(value)
    return str(value) if isinstance(value, int) else "x".join(map(str, value))
