"""The plain records a merge space is made of: convs, skips, units, graph nodes, entries.

Positions follow docs/method.md: conv `p` (1-based) sits between positions `p-1` and `p`;
position `p` is "after conv p" (after its norm, its skip-add and its activation). A block
`(i, j)` merges convs `i+1 .. j` into one conv.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

from ..capture.registry import NodeKind
from ..sides import Sides, compact, largest

MAX_KERNEL_BYTES = 2**29  # 512 MiB: the largest kernel a merge may materialise (§1)


class StrideRule(str, Enum):
    """What may follow a strided conv inside a block (docs/method.md §2)."""

    PAPER = "paper"  # one 1x1 conv at most, as the authors
    EXACT = "exact"  # any kernel, merged by dilating it

    def __str__(self) -> str:
        return self.value


class Entry(NamedTuple):
    """One table entry: block `(i, j)` merged into a conv of kernel `k` (its extent per
    axis, `Sides`), depthwise or not."""

    i: int
    j: int
    k: Sides
    dw: bool


@dataclass(frozen=True)
class DepthKey:
    """Depth's importance key for a block whose ends it may change: block `(i, j)` merged
    whole, with an activation after position `i` (`start`) and after `j` (`end`) or not.
    (A dataclass, not a tuple, so that it never equals an `Entry`.)"""

    i: int
    j: int
    start: bool
    end: bool


class KernelOption(NamedTuple):
    kernel: Sides
    depthwise: bool


IDENTITY = KernelOption(0, False)  # a block that keeps no conv: latency 0


class MergedConv(NamedTuple):
    """The conv an entry becomes, in native form: taps per axis, their dilation, groups, and
    the bytes of its float64 kernel (what the merge materialises)."""

    kernel: Sides
    dilation: Sides
    groups: int
    bytes: int


@dataclass(frozen=True)
class Conv:
    """A searchable convolution of the main path, or a region of parallel branches read as
    the one conv it collapses into (named after its largest conv; docs/method.md §4b)."""

    index: int
    name: str
    node: str
    in_channels: int
    out_channels: int
    kernel: Sides  # these four per axis (`fxmerge.sides`)
    stride: Sides
    padding: Sides
    dilation: Sides
    groups: int
    bias: bool
    norm: str | None
    activation: str | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    relocatable_norm: str | None = None  # a GroupNorm before the activation (DDPM)
    activation_module: str | None = None  # the module the activation node calls
    score: float = 0.0  # eq. 3's score: the l1 norm of the weight, at analysis

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "padding", "dilation"):
            value = getattr(self, name)
            if not isinstance(value, int):  # a module's tuple, a JSON list
                object.__setattr__(self, name, compact(value))

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def rank(self) -> int:
        """Spatial dimensions: 1 (Conv1d), 2 or 3."""
        return len(self.in_shape) - 2

    @property
    def irreducible(self) -> bool:
        """Input and output shapes differ (or it strides), so it cannot become identity."""
        return self.in_shape != self.out_shape or largest(self.stride) > 1


@dataclass(frozen=True)
class Skip:
    """A residual segment: the value at position `source` is added at position `target`."""

    source: int
    target: int
    add_node: str
    source_node: str
    projection: str | None = None
    projection_norm: str | None = None
    projection_stride: int = 1


@dataclass(frozen=True)
class GraphNode:
    """One node of the analysed graph, as plain data: its name, op, target, kind and the
    names of the nodes it reads."""

    name: str
    op: str
    target: str
    kind: NodeKind
    inputs: tuple[str, ...]
    op_name: str = ""  # the module's class or the function's name: `Conv2d`, `cat`, `mul`
    label: str = ""  # what a barrier is, for reports (its family's label)


@dataclass(frozen=True)
class Unit:
    """FX node names of one conv's unit: conv -> [foldable norm] -> [conditioning add] ->
    [skip add] -> [relocatable norm -> activation] (or [activation])."""

    input: str
    conv: str  # the conv node, or a region's output (its root add)
    norm: str | None
    add: str | None
    act: str | None
    cond: str | None = None
    rnorm: str | None = None
    region: tuple[str, ...] = ()  # a region's nodes, its output last (`capture.regions`)

    @property
    def pre_skip(self) -> str:
        """The value the skip is added to (where a relocated norm goes)."""
        return self.cond or self.norm or self.conv

    @property
    def pre_activation(self) -> str:
        return self.rnorm or self.add or self.pre_skip

    @property
    def output(self) -> str:
        return self.act or self.pre_activation


class SpaceView(Protocol):
    """What the kernel search and the reports read of a `MergeSpace` (they sit below it)."""

    convs: tuple[Conv, ...]
    skips: tuple[Skip, ...]
    breaks: frozenset[int]
    nodes: tuple[GraphNode, ...]
    regions: tuple
    left_out: Mapping[str, str]
    stride_rule: StrideRule
    add_activations: bool | None
    max_kernel_bytes: int
    capture: str

    @property
    def L(self) -> int: ...
    @property
    def conv_scores(self) -> Mapping[str, float]: ...
    @property
    def irreducible(self) -> frozenset[int]: ...
    @property
    def barriers(self) -> tuple[str, ...]: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_entries(self) -> int: ...
    @property
    def over_bound(self) -> int: ...
    @property
    def added_activation(self) -> str | None: ...
