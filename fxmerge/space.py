"""MergeSpace: the LayerMerge search space, derived from a traced graph alone.

Positions follow method.md: conv `p` (1-based) sits between positions `p-1` and `p`;
position `p` is "after conv p" (after its norm, its skip-add and its activation).
A block `(i, j)` merges convs `i+1 .. j` into one conv.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from functools import cached_property
from typing import Any, NamedTuple

import networkx as nx
from torch import Tensor, fx, nn

from .capture import capture_path, check_canonical, example_inputs, ops
from .capture.regions import Branch, Region, collapse, find_regions
from .errors import ArgumentError, SpaceError, TraceError

STRIDE_RULES = ("paper", "exact")


class Entry(NamedTuple):
    """One table entry: block `(i, j)` merged into a `k`x`k` conv, depthwise or not."""

    i: int
    j: int
    k: int
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
    kernel: int
    depthwise: bool


@dataclass(frozen=True)
class Conv:
    """A searchable convolution of the main path, or a region of parallel branches read as
    the one conv it collapses into (named after its largest conv; docs/method.md §4b)."""

    index: int
    name: str
    node: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    bias: bool
    norm: str | None
    activation: str | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    relocatable_norm: str | None = None  # a GroupNorm before the activation (DDPM)
    activation_module: str | None = None  # the module the activation node calls
    score: float = 0.0  # eq. 3's score: the l1 norm of the weight, at analysis

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def irreducible(self) -> bool:
        """Input and output shapes differ (or it strides), so it cannot become identity."""
        return self.in_shape != self.out_shape or self.stride > 1


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


class NodeKind(str, Enum):
    """What a graph node is to the search (the vocabulary is `capture.ops`)."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    GET_ATTR = "get_attr"
    CONV = "conv"
    NORM = "norm"
    ACTIVATION = "activation"
    ADD = "add"
    SCALE = "scale"  # a per-channel scale, one branch of a region
    PAD = "pad"
    BARRIER = "barrier"  # anything else: never merged through

    def __str__(self) -> str:
        return self.value


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


# what barrier ops usually are, for reports (anything else is named by its op)
BARRIER_KINDS = {
    "cat": "concatenation", "stack": "concatenation", "mul": "products (gates, attention)",
    "sigmoid": "gates", "Sigmoid": "gates", "Hardsigmoid": "gates", "hardsigmoid": "gates",
    "adaptive_avg_pool2d": "pooling", "AdaptiveAvgPool2d": "pooling", "mean": "pooling",
    "avg_pool2d": "pooling", "AvgPool2d": "pooling", "max_pool2d": "pooling",
    "MaxPool2d": "pooling", "interpolate": "upsampling", "Upsample": "upsampling",
    "upsample_nearest2d": "upsampling", "upsample_bilinear2d": "upsampling",
    "ConvTranspose2d": "upsampling", "getitem": "splits and indexing", "split": "splits and "
    "indexing", "chunk": "splits and indexing", "split_with_sizes": "splits and indexing",
    "Dropout": "dropout", "dropout": "dropout", "Linear": "linear layers",
    "linear": "linear layers", "flatten": "reshapes", "view": "reshapes",
    "reshape": "reshapes", "Flatten": "reshapes", "permute": "reshapes",
}


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


@dataclass(frozen=True)
class _SkipBranch:
    source: fx.Node
    main: fx.Node
    branch: tuple[fx.Node, ...]


class MergedConv(NamedTuple):
    """The conv an entry becomes, in native form: taps per side, their dilation, groups, and
    the bytes of its float64 kernel (what the merge materialises)."""

    kernel: int
    dilation: int
    groups: int
    bytes: int


IDENTITY = KernelOption(0, False)  # a block that keeps no conv: latency 0
MAX_KERNEL_BYTES = 2**29  # 512 MiB: the largest kernel a merge may materialise (§1)
# (extent, stride, depthwise, any conv kept, tap step, groups, over the bound) of no conv; a
# step or groups of 0 is "not yet set" (gcd(0, n) = n)
_EMPTY = (1, 1, True, False, 0, 0, False)


def _keep(state: tuple, c: Conv) -> tuple:
    """The merged state after also keeping conv `c`: its kernel, its taps `dilation * s`
    apart, widens the receptive field; strides multiply; the taps lie on the gcd of the
    kept convs' steps (a 1x1 has none); the groups are the gcd of theirs; depthwise only if
    every conv is (docs/method.md §4). Whether it is over the bound is the space's to say."""
    k, s, dw, _, step, groups, over = state
    tap = c.dilation * s if c.kernel > 1 else 0
    return (k + (c.kernel - 1) * tap, s * c.stride, dw and c.depthwise, True,
            math.gcd(step, tap), math.gcd(groups, c.groups), over)


def _taps(state: tuple) -> int:
    """Taps per side of a merged state's kernel."""
    extent, step = state[0], state[4]
    return (extent - 1) // step + 1 if step else 1


class MergeSpace:
    """Convs, skips, breaks, legal blocks and table entries of one traced graph: frozen
    plain data (no module, no weights), saved with `to_json` and compared with `==`."""

    def __init__(
        self,
        convs: Iterable[Conv],
        units: Iterable[Unit],
        skips: Iterable[Skip],
        breaks: Iterable[int],
        nodes: Iterable[GraphNode],
        stride_rule: str,
        exclude: Iterable[str] = (),
        left_out: Mapping[str, str] | None = None,
        add_activations: bool | None = False,
        max_kernel_bytes: int = MAX_KERNEL_BYTES,
        capture: str = "unknown",
        input_shapes: Iterable[tuple[int, ...]] = (),
        regions: Iterable[Region] = (),
    ) -> None:
        set_ = object.__setattr__
        set_(self, "capture", capture)  # how the graph was captured (`capture_path`)
        # the example inputs' shapes, batch aside (what a plan's shapes depend on)
        set_(self, "input_shapes", tuple(tuple(shape) for shape in input_shapes))
        set_(self, "convs", tuple(convs))
        # regions of parallel branches, each one position named after its largest conv
        set_(self, "regions", tuple(regions))
        set_(self, "units", tuple(units))
        set_(self, "skips", tuple(skips))
        set_(self, "breaks", frozenset(breaks))
        set_(self, "nodes", tuple(nodes))
        set_(self, "stride_rule", stride_rule)
        set_(self, "exclude", tuple(sorted(exclude)))
        set_(self, "left_out", dict(left_out or {}))
        set_(self, "max_kernel_bytes", max_kernel_bytes)
        set_(self, "_merged", {})  # each entry's merged conv, filled by _enumerate_blocks
        options, over_bound, oversized = self._enumerate_blocks()
        set_(self, "_options", options)
        set_(self, "_over_bound", over_bound)  # options left out for their kernel's size
        set_(self, "oversized", frozenset(oversized))  # blocks with every option left out
        if add_activations is None:  # as the authors: not where GroupNorms precede them
            add_activations = not any(c.relocatable_norm for c in self.convs)
        # on only where it changes something: a block of several convs ending without one
        set_(self, "add_activations", add_activations and self.added_activation is not None
             and any(j - i >= 2 and self.activation(j) is None for i, j in self._options))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a MergeSpace is frozen: analyze the graph again to change "
                             f"{name!r}")

    # ---- plain data ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything the space was built from, as JSON-ready data (blocks and entries
        follow from it)."""
        return {"convs": [asdict(c) for c in self.convs],
                "units": [asdict(u) for u in self.units],
                "skips": [asdict(s) for s in self.skips],
                "breaks": sorted(self.breaks),
                "nodes": [asdict(n) for n in self.nodes],
                "stride_rule": self.stride_rule, "exclude": list(self.exclude),
                "left_out": self.left_out, "add_activations": self.add_activations,
                "max_kernel_bytes": self.max_kernel_bytes, "capture": self.capture,
                "input_shapes": [list(shape) for shape in self.input_shapes],
                "regions": [asdict(r) for r in self.regions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeSpace:
        """The space `to_dict` wrote; `SpaceError` for anything else."""
        try:
            return cls(
                [Conv(**{**c, "in_shape": tuple(c["in_shape"]),
                         "out_shape": tuple(c["out_shape"])}) for c in data["convs"]],
                [Unit(**{**u, "region": tuple(u.get("region", ()))}) for u in data["units"]],
                [Skip(**s) for s in data["skips"]],
                data["breaks"],
                [GraphNode(**{**n, "kind": NodeKind(n["kind"]), "inputs": tuple(n["inputs"])})
                 for n in data["nodes"]],
                data["stride_rule"], data["exclude"], data["left_out"],
                data["add_activations"], data["max_kernel_bytes"],
                data.get("capture", "unknown"), data.get("input_shapes", ()),
                [Region(**{**r, "nodes": tuple(r["nodes"]), "branches": tuple(
                    Branch(**{**b, "padding": tuple(b["padding"])}) for b in r["branches"])})
                 for r in data.get("regions", ())])
        except (KeyError, TypeError, ValueError) as exc:
            raise SpaceError(f"not a saved MergeSpace: {type(exc).__name__}: {exc}") from None

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps({"kind": "space", "signature": self.signature, **self.to_dict()},
                          indent=indent)

    @classmethod
    def from_json(cls, text: str) -> MergeSpace:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpaceError(f"not a saved MergeSpace: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != "space":
            raise SpaceError("not a saved MergeSpace: no \"kind\": \"space\"")
        space = cls.from_dict(data)
        if space.signature != data.get("signature"):
            raise SpaceError(f"saved MergeSpace: its signature {data.get('signature')!r} is "
                             f"not that of its contents ({space.signature})")
        return space

    def describes(self, gm: fx.GraphModule) -> bool:
        """Whether this space was analysed from `gm` (or a copy of it): the same nodes, in
        order, calling the same targets."""
        return [(n.name, n.op, str(n.target)) for n in gm.graph.nodes] == [
            (n.name, n.op, n.target) for n in self.nodes]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.signature)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def L(self) -> int:
        return len(self.convs)

    @property
    def irreducible(self) -> frozenset[int]:
        return frozenset(c.index for c in self.convs if c.irreducible)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._options)

    @property
    def num_blocks(self) -> int:
        return len(self._options)

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(
            Entry(i, j, opt.kernel, opt.depthwise)
            for (i, j), opts in self._options.items()
            for opt in opts
        )

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def kernel_options(self, i: int, j: int) -> tuple[KernelOption, ...]:
        """`K_ij`: the (kernel, depthwise) pairs reachable in block `(i, j)`; () if illegal."""
        return self._options.get((i, j), ())

    def conv(self, name_or_index: str | int) -> Conv:
        if isinstance(name_or_index, int):
            return self.convs[name_or_index - 1]
        for c in self.convs:
            if c.name == name_or_index:
                return c
        raise KeyError(name_or_index)

    def region(self, name: str) -> Region | None:
        """The region of parallel branches position `name` stands for, if it is one."""
        return next((r for r in self.regions if r.name == name), None)

    def activation(self, p: int) -> str | None:
        """The activation at position `p` (None at 0 and where the network has none)."""
        return self.convs[p - 1].activation if p >= 1 else None

    @cached_property
    def added_activation(self) -> str | None:
        """The network's most common activation: the one `add_activations` inserts."""
        kinds = Counter(c.activation for c in self.convs if c.activation)
        return kinds.most_common(1)[0][0] if kinds else None

    def end_activation(self, i: int, j: int) -> str | None:
        """The activation after block `(i, j)` once merged: the network's at `j`, or, with
        `add_activations`, the added one after a block of several convs that ends where the
        network has none (docs/method.md §4)."""
        if self.activation(j) is None and self.add_activations and j - i >= 2:
            return self.added_activation
        return self.activation(j)

    def activation_options(self, p: int) -> tuple[bool, ...]:
        """Whether an activation may follow position `p` at a Depth block's end: where the
        network has one (and at the input) it stays; where it has none, Depth may add one
        when `add_activations` is on (its paper's choice at MobileNetV2's block ends)."""
        if p == 0 or self.activation(p) is not None:
            return (True,)
        return (False, True) if self.add_activations else (False,)

    def _as_is(self, i: int, j: int) -> tuple[bool, bool]:
        """(start, end) activations of block `(i, j)` as its full entry has them."""
        return i == 0 or self.activation(i) is not None, self.end_activation(i, j) is not None

    def activation_choices(self, i: int, j: int) -> tuple[tuple[bool, bool], ...]:
        """Depth's (start, end) activation choices for block `(i, j)`, restricted as its
        authors do: a block starting where the network has no activation chooses its
        start (and has one at its end where it may), any other block chooses its end; the
        full entry's choice is always among them, so the original network is a path."""
        starts, ends = self.activation_options(i), self.activation_options(j)
        if len(starts) > 1:
            choices = {(start, ends[-1]) for start in starts}
        else:
            choices = {(starts[0], end) for end in ends}
        return tuple(sorted(choices | {self._as_is(i, j)}))

    def depth_key(self, i: int, j: int, start: bool, end: bool) -> Entry | DepthKey | None:
        """The importance key scoring block `(i, j)` merged whole with these end
        activations: None for the original network (one conv, its ends as they are), the
        block's full entry when that entry's network is the same, else a `DepthKey`."""
        if (start, end) != self._as_is(i, j):
            return DepthKey(i, j, start, end)
        return None if j == i + 1 else self.full_entries[(i, j)]

    @cached_property
    def depth_choices(self) -> dict[tuple[int, int],
                                    tuple[tuple[bool, bool, Entry | DepthKey | None], ...]]:
        """Every block's `(start, end, depth_key(...))` activation choices, computed once
        (what the Depth solver reads)."""
        return {(i, j): tuple((start, end, self.depth_key(i, j, start, end))
                              for start, end in self.activation_choices(i, j))
                for i, j in self.full_entries}

    @cached_property
    def depth_keys(self) -> tuple[DepthKey, ...]:
        """The keys Depth's activation choices need beyond the full entries."""
        return tuple(key for choices in self.depth_choices.values()
                     for _, _, key in choices if isinstance(key, DepthKey))

    def input_shape(self, p: int) -> tuple[int, ...]:
        """Shape of the value at position `p`, as the conv after it sees it."""
        if p < self.L:
            return self.convs[p].in_shape
        return self.convs[-1].out_shape

    @cached_property
    def signature(self) -> str:
        """A short hash identifying the graph's searchable structure (for tables and plans);
        it leaves out the batch size, so a plan applies at any batch."""
        text = "|".join(
            f"{c.name}:{c.in_shape[1:]}:{c.out_shape[1:]}:{c.kernel}:{c.stride}:{c.groups}"
            + (f":d{c.dilation}" if c.dilation != 1 else "")
            for c in self.convs
        )
        text += f"|{sorted(self.breaks)}|{[(s.source, s.target) for s in self.skips]}"
        text += f"|{self.stride_rule}"
        if self.regions:  # the same convs, read as regions or not, prune differently
            text += f"|regions={[r.name for r in self.regions]}"
        if self.add_activations:  # latency entries and pruned networks differ with it
            text += "|add_activations"
        if self._over_bound:  # the bound left entries out
            text += f"|max_kernel_bytes={self.max_kernel_bytes}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    # ---- block enumeration -----------------------------------------------------------
    def _crosses_segment(self, i: int, j: int) -> bool:
        return any(
            (i < s.source < j < s.target) or (s.source < i < s.target < j) for s in self.skips
        )

    def kernel_of(self, kept: Iterable[int]) -> KernelOption:
        """Merged (kernel, depthwise) of the convs with these indices, in order."""
        state = _EMPTY
        for idx in sorted(kept):
            state = _keep(state, self.convs[idx - 1])
        return KernelOption(state[0], state[2])

    @cached_property
    def full_entries(self) -> dict[tuple[int, int], Entry]:
        """Every legal block's entry with all its convs kept (what Depth merges; for one
        conv, the entry that leaves it as it is)."""
        full = {(i, j): Entry(i, j, *self.kernel_of(range(i + 1, j + 1)))
                for i, j in self._options}
        return {block: e for block, e in full.items() if e in self._merged}

    def _composition_bytes(self, i: int, state: tuple, c: Conv, new: tuple) -> int:
        """The most a merge of block `(i, ...)` materialises when it composes conv `c` onto
        the convs merged into `state`, giving `new` (0 when nothing is composed: `c` comes
        first): the new kernel, or the merged one re-grouped to the new groups, whichever
        has more outputs."""
        if not state[3]:
            return 0
        in_per_group = self.convs[i].in_channels // new[5]
        return max(c.in_channels, c.out_channels) * in_per_group * _taps(new) ** 2 * 8

    def _extend(self, i: int, state: tuple, c: Conv) -> tuple:
        """`_keep`, and whether block `(i, ...)`'s merge has now gone over the bound."""
        new = _keep(state, c)
        over = state[6] or self._composition_bytes(i, state, c, new) > self.max_kernel_bytes
        return (*new[:6], over)

    def merge_peak_bytes(self, i: int, kept: Iterable[int]) -> int:
        """The most merging these convs (indices) of a block starting at `i` materialises."""
        state, peak = _EMPTY, 0
        for idx in sorted(kept):
            c = self.convs[idx - 1]
            new = _keep(state, c)
            peak = max(peak, self._composition_bytes(i, state, c, new))
            state = new
        return peak

    def _states(self, i: int, j: int):
        """Every merged state (see `_keep`) reachable keeping R and any reducible convs."""
        states = {_EMPTY}
        for c in self.convs[i:j]:
            kept = {self._extend(i, state, c) for state in states}
            states = kept if c.irreducible else kept | states
        return states

    def _merged_conv(self, i: int, j: int, state: tuple) -> MergedConv:
        """The native conv block `(i, j)` becomes from a merged `state`: its taps, their
        dilation, its groups (1 where it fuses a projection shortcut) and kernel bytes."""
        step, groups = state[4], state[5]
        if any(i <= s.source and s.target <= j and s.projection for s in self.skips):
            groups = 1
        kernel = _taps(state)
        in_channels, out_channels = self.convs[i].in_channels, self.convs[j - 1].out_channels
        return MergedConv(kernel, step or 1, groups,
                          out_channels * (in_channels // groups) * kernel * kernel * 8)

    def merged_conv(self, entry: Entry) -> MergedConv:
        """The conv entry `(i, j, k, dw)` merges into (where subsets of the block's convs
        reach the same `k` on different lattices or groups, the largest of them); an identity
        entry makes no conv (kernel 0, no bytes)."""
        if (entry.k, entry.dw) == IDENTITY:
            return MergedConv(0, 1, 1, 0)
        return self._merged[entry]

    def _enumerate_blocks(self) -> tuple[dict[tuple[int, int], tuple[KernelOption, ...]], int,
                                         set[tuple[int, int]]]:
        """The legal blocks' kernel options; how many options the bound left out; the
        blocks it left without any."""
        options: dict[tuple[int, int], tuple[KernelOption, ...]] = {}
        over_bound, oversized = 0, set()
        for i in range(self.L):
            for j in range(i + 1, self.L + 1):
                if j - 1 > i and (j - 1) in self.breaks:
                    break
                if self._crosses_segment(i, j):
                    continue
                merged: dict[KernelOption, MergedConv] = {}
                over: set[KernelOption] = set()
                for state in self._states(i, j):
                    if not state[3]:
                        continue
                    option = KernelOption(state[0], state[2])
                    if state[6]:  # its merge would materialise too much
                        over.add(option)
                        continue
                    conv = self._merged_conv(i, j, state)
                    if option not in merged or conv.bytes > merged[option].bytes:
                        merged[option] = conv
                over_bound += len(over - set(merged))
                self._merged.update({Entry(i, j, *o): conv for o, conv in merged.items()})
                if merged:
                    options[(i, j)] = tuple(sorted(merged))
                elif over:
                    oversized.add((i, j))
        for p in self._removable_alone(options):
            options[(p - 1, p)] = (IDENTITY, *options[(p - 1, p)])
        return options, over_bound, oversized

    def _removable_alone(self, options: Mapping[tuple[int, int], object]) -> list[int]:
        """Reducible convs that only a block of their own can hold, outside every residual
        segment (the 3x3 conv after an upsample): removing them is an entry of its own,
        since no neighbouring block can absorb the identity."""
        return [c.index for c in self.convs
                if not c.irreducible
                and [b for b in options if b[0] < c.index <= b[1]] == [(c.index - 1, c.index)]
                and not any(s.source < c.index <= s.target for s in self.skips)]

    @cached_property
    def conv_scores(self) -> dict[str, float]:
        """Eq. 3's score of each conv: the l1 norm of its weight, recorded at analysis."""
        return {c.name: c.score for c in self.convs}

    @property
    def barriers(self) -> tuple[str, ...]:
        """The nodes the search never merges through."""
        return tuple(n.name for n in self.nodes if n.kind is NodeKind.BARRIER)

    def choose_convs(
        self, i: int, j: int, k: int, dw: bool, scores: Mapping[str, float] | None = None
    ) -> tuple[str, ...]:
        """Eq. 3: among the kept-conv subsets of block `(i, j)` that contain every irreducible
        conv and give kernel `k` (depthwise `dw`), and merge within `max_kernel_bytes`, the
        one with the largest total score (`conv_scores` unless given)."""
        scores = self.conv_scores if scores is None else scores
        if (k, dw) == IDENTITY:
            return ()
        best: dict[tuple, tuple[float, tuple[str, ...]]] = {_EMPTY: (0.0, ())}
        for c in self.convs[i:j]:
            nxt: dict[tuple, tuple[float, tuple[str, ...]]] = {}
            for state, (score, kept) in best.items():
                cand = [(self._extend(i, state, c), (score + scores[c.name], kept + (c.name,)))]
                if not c.irreducible:
                    cand.append((state, (score, kept)))
                for key, val in cand:
                    if key not in nxt or val[0] > nxt[key][0]:
                        nxt[key] = val
            best = nxt
        found = [v for (kk, _, d, kept, _, _, over), v in best.items()
                 if kept and not over and kk == k and d == dw]
        if not found:
            raise KeyError(f"no kept-conv subset of block ({i}, {j}) gives kernel {k}, dw={dw}")
        return max(found)[1]

    # ---- views ---------------------------------------------------------------------------
    @cached_property
    def graph(self) -> nx.DiGraph:
        """A NetworkX view of the FX graph; nodes carry `op`, `target`, `kind`, `position`."""
        position = {u.conv: c.index for c, u in zip(self.convs, self.units)}
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, op=n.op, target=n.target, kind=n.kind,
                       position=position.get(n.name))
            g.add_edges_from((a, n.name) for a in n.inputs)
        return g

    def reach(self) -> dict[str, Any]:
        """What the search can change and what stops the rest: searched convs and
        activations against the graph's, convs left out with why, and the barrier ops by
        kind (`BARRIER_KINDS`)."""
        projections = {s.projection for s in self.skips if s.projection}
        members = {b.conv for r in self.regions for b in r.branches if b.conv}
        searched = {c.name for c in self.convs} | projections | members
        conv_nodes = [n for n in self.nodes if n.kind is NodeKind.CONV]
        barriers = Counter(BARRIER_KINDS.get(n.op_name, n.op_name or n.target)
                           for n in self.nodes if n.kind is NodeKind.BARRIER)
        return {
            "convs": len(conv_nodes), "searched_convs": self.L - len(self.regions) + len(members),
            "regions": len(self.regions), "region_convs": len(members),
            "skip_projections": len(projections),
            "other_convs": len([n for n in conv_nodes if n.target not in searched]),
            "activations": sum(n.kind is NodeKind.ACTIVATION for n in self.nodes),
            "searched_activations": sum(c.activation is not None for c in self.convs),
            "left_out": dict(self.left_out),
            "barriers": dict(barriers.most_common()),
        }

    def summary(self) -> str:
        """A readable table of the searched convs and the size of the space."""
        header = (f"{'pos':>4}  {'conv':<28} {'in->out':>11} {'k':>2} {'s':>2} {'g':>4}  "
                  f"{'act':<9} {'R':<1} note")
        lines = [header]
        starts = {s.source: s for s in self.skips}
        ends = {s.target: s for s in self.skips}
        for c in self.convs:
            note = []
            if c.index - 1 in starts:
                note.append(f"skip from {c.index - 1}")
            if c.index in ends:
                skip = ends[c.index]
                note.append(f"add ({skip.source}->{c.index}" + (
                    f", proj {skip.projection})" if skip.projection else ")"))
            if c.index in self.breaks:
                note.append("break")
            lines.append(
                f"{c.index:>4}  {c.name:<28} {c.in_channels:>5}->{c.out_channels:<5}"
                f"{c.kernel:>2} {c.stride:>2} {c.groups:>4}  {c.activation or '-':<9} "
                f"{'R' if c.irreducible else ' '} {', '.join(note)}"
            )
        for name, why in self.left_out.items():
            lines.append(f"   -  {name:<28} not searched: {why}")
        lines.append(
            f"L={self.L} convs, {len(self.irreducible)} irreducible, {len(self.skips)} skips, "
            f"{len(self.barriers)} barrier nodes, stride_rule={self.stride_rule}: "
            f"{self.num_blocks} blocks, {self.num_entries} entries"
        )
        reach = self.reach()
        if self.regions:
            lines.append(f"{reach['regions']} regions of parallel branches ("
                         f"{reach['region_convs']} convs) each searched as one conv")
        lines.append(
            f"captured by {self.capture}; searched: {reach['searched_convs']} of "
            f"{reach['convs']} convs (+{reach['skip_projections']} skip projections), "
            f"{reach['searched_activations']} of {reach['activations']} activations")
        if reach["barriers"]:
            lines.append("what stops the rest (barrier ops by kind): " + ", ".join(
                f"{n} {kind}" for kind, n in reach["barriers"].items()))
        if self._over_bound:
            lines.append(f"{self._over_bound} merged kernels over max_kernel_bytes="
                         f"{self.max_kernel_bytes} not offered")
        if self.add_activations:
            lines.append(f"add_activations: a {self.added_activation} after each merged "
                         "block of several convs that ends without an activation")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"MergeSpace(L={self.L}, blocks={self.num_blocks}, entries={self.num_entries}, "
                f"skips={len(self.skips)}, stride_rule={self.stride_rule!r})")


# ---- analysis ---------------------------------------------------------------------------
def _node_kind(gm: fx.GraphModule, n: fx.Node, in_region: bool) -> NodeKind:
    if n.op in ("placeholder", "output", "get_attr"):
        return NodeKind(n.op)
    if ops.is_conv(gm, n):
        return NodeKind.CONV
    if ops.is_norm(gm, n):
        return NodeKind.NORM
    if ops.activation_kind(gm, n):
        return NodeKind.ACTIVATION
    if ops.is_add(n):
        return NodeKind.ADD
    if ops.pad_amount(n) is not None:
        return NodeKind.PAD
    if in_region and ops.channel_scale(gm, n) is not None:
        return NodeKind.SCALE
    return NodeKind.BARRIER


def _op_name(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return name.split(".")[0]  # aten's "cat.default" is "cat"
    return str(n.target) if n.op == "call_method" else n.op


def _graph_nodes(gm: fx.GraphModule, in_regions: set[str]) -> list[GraphNode]:
    return [GraphNode(n.name, n.op, str(n.target), _node_kind(gm, n, n.name in in_regions),
                      tuple(a.name for a in n.all_input_nodes), _op_name(gm, n))
            for n in gm.graph.nodes]


def left_out_convs(gm: fx.GraphModule, exclude: Iterable[str]) -> dict[str, str]:
    """Each conv module that is not searched, with the reason."""
    sites = ops.call_sites(gm)
    reasons = {}
    for name, m in gm.named_modules():
        if not isinstance(m, nn.Conv2d) or name not in sites:
            continue
        if ops.excluded(name, exclude):
            reasons[name] = "excluded"
        elif ops.has_hooks(m):
            reasons[name] = "has forward hooks or pre-hooks (a merge would drop them)"
        elif sites[name] > 1:
            reasons[name] = f"called from {sites[name]} places (shared weights)"
        elif ops.conv_refusal(m) is not None:
            reasons[name] = ops.conv_refusal(m)
    return reasons


def _searchable(gm: fx.GraphModule, node: fx.Node, left_out: Mapping[str, str]) -> bool:
    return ops.is_conv(gm, node) and node.target not in left_out


def _strip_skip_branch(gm: fx.GraphModule, node: fx.Node, left_out: Mapping[str, str]):
    """Walk back over `[pad] [conv 1x1 [norm]] [pad]` that only feed the add."""
    branch: list[fx.Node] = []
    cur = node

    def strip_pads() -> None:
        nonlocal cur
        while ops.pad_amount(cur) is not None and len(cur.users) == 1:
            branch.append(cur)
            cur = cur.args[0]

    strip_pads()
    if ops.is_norm(gm, cur) and len(cur.users) == 1:
        branch.append(cur)
        cur = cur.args[0]
        if not ops.is_conv(gm, cur):
            return None
    if ops.is_conv(gm, cur) and len(cur.users) == 1:
        conv = ops.module_of(gm, cur)
        if not (_searchable(gm, cur, left_out) and conv.kernel_size[0] == 1
                and conv.padding[0] == 0 and conv.groups == 1):
            return None
        branch.append(cur)
        cur = cur.args[0]
        strip_pads()
    return cur, tuple(branch)


def _find_skip_adds(gm: fx.GraphModule, left_out: Mapping[str, str], in_regions: set[str]
                    ) -> dict[fx.Node, _SkipBranch]:
    """Adds whose one operand is a (projected) earlier value on the other operand's path
    (a region's adds are its own)."""
    found = {}
    for node in gm.graph.nodes:
        if not ops.is_add(node) or node.name in in_regions:
            continue
        a, b = node.args
        candidates = []
        for main, skip in ((a, b), (b, a)):
            stripped = _strip_skip_branch(gm, skip, left_out)
            if stripped and stripped[0] in ops.ancestors(main):
                candidates.append(_SkipBranch(stripped[0], main, stripped[1]))
        if candidates:
            found[node] = min(candidates, key=lambda c: len(c.branch))
    return found


def _build_unit(gm: fx.GraphModule, conv: fx.Node, adds: dict[fx.Node, _SkipBranch],
                region: Region | None) -> Unit:
    cur = conv
    norm = cond = add = rnorm = act = None
    nxt = ops.only_user(cur)
    if nxt is not None and ops.is_norm(gm, nxt):
        norm = cur = nxt
        nxt = ops.only_user(cur)
    pair = ops.conditioning_add(nxt) if nxt is not None else None
    if pair is not None and pair[0] is cur and conv not in ops.ancestors(pair[1]):
        cond = cur = nxt
        nxt = ops.only_user(cur)
    if nxt is not None and nxt in adds and adds[nxt].main is cur:
        add = cur = nxt
        nxt = ops.only_user(cur)
    if nxt is not None and ops.is_relocatable_norm(gm, nxt):
        after = ops.only_user(nxt)
        if after is not None and ops.activation_kind(gm, after):
            rnorm, act = nxt, after
    elif nxt is not None and ops.activation_kind(gm, nxt):
        act = nxt
    name = lambda n: n.name if n is not None else None
    return Unit(region.input if region else conv.args[0].name, conv.name, name(norm),
                name(add), name(act), name(cond), name(rnorm), region.nodes if region else ())


def analyze(
    gm: fx.GraphModule, *, stride_rule: str = "paper", exclude: Iterable[str] = (),
    add_activations: bool | None = None, max_kernel_bytes: int = MAX_KERNEL_BYTES,
) -> MergeSpace:
    """Derive the LayerMerge search space of a traced graph (see `fxmerge.trace`).

    `stride_rule="paper"` lets a strided conv be followed inside a block only by one 1x1
    conv; `"exact"` allows any later kernel (merged by dilating it). `exclude` holds module
    names or glob patterns (`"*.downsample.0"`) of convs kept out of the search; they act as
    barriers, as do convs with hooks or called from several places (see `summary()`).
    `add_activations`: insert the network's activation after merged blocks of several convs
    that end where it has none, in latency entries, importance, solving and pruning alike.
    By default on, as the authors do for their classifiers, except in networks with
    relocatable norms (GroupNorm before the activations: diffusion U-Nets, where they add
    none). `max_kernel_bytes` bounds the merged kernels offered (their float64 size, what
    `merge` materialises): a larger composition is not an entry (a single conv always is).
    """
    try:
        check_canonical(gm)
    except TraceError as exc:  # the graph, not the space, is what is wrong
        raise SpaceError(str(exc)) from None
    if stride_rule not in STRIDE_RULES:
        raise SpaceError(f"stride_rule must be one of {STRIDE_RULES}, got {stride_rule!r}")
    if isinstance(max_kernel_bytes, bool) or not isinstance(max_kernel_bytes, int) \
            or max_kernel_bytes <= 0:
        raise SpaceError(f"max_kernel_bytes must be a positive number of bytes, got "
                         f"{max_kernel_bytes!r}")
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise ArgumentError(f"exclude must be a list of module names or glob patterns, got "
                            f"{exclude!r}")
    exclude = set(exclude)
    convs_named = [n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in convs_named):
            raise SpaceError(f"exclude names '{pattern}', which matches no Conv2d of this model")
    regions = {r.output: r for r in find_regions(gm, exclude)}
    in_regions = {name for r in regions.values() for name in r.nodes}
    members = {b.conv for r in regions.values() for b in r.branches if b.conv}
    left_out = {n: why for n, why in left_out_convs(gm, exclude).items() if n not in members}
    nodes = {n.name: n for n in gm.graph.nodes}

    adds = _find_skip_adds(gm, left_out, in_regions)
    while True:
        branch_nodes = {b for sk in adds.values() for b in sk.branch}
        conv_nodes = [n for n in gm.graph.nodes if n not in branch_nodes and (
            n.name in regions or (_searchable(gm, n, left_out) and n.name not in in_regions))]
        units = [_build_unit(gm, n, adds, regions.get(n.name)) for n in conv_nodes]
        value_position = {}
        for p, u in enumerate(units):
            value_position.setdefault(u.input, p)
            value_position[u.output] = p + 1
        bad = [add for add, sk in adds.items()
               if sk.source.name not in value_position
               or not any(u.add == add.name for u in units)]
        if not bad:
            break
        for add in bad:
            del adds[add]

    L = len(units)
    if L == 0:
        raise SpaceError("the graph has no searchable Conv2d on a main path")
    skips, skip_users = [], {}
    for p, u in enumerate(units, start=1):
        if u.add is None:
            continue
        sk = adds[nodes[u.add]]
        convs_in_branch = [b for b in sk.branch if ops.is_conv(gm, b)]
        norms_in_branch = [b for b in sk.branch if ops.is_norm(gm, b)]
        skips.append(Skip(
            source=value_position[sk.source.name], target=p, add_node=u.add,
            source_node=sk.source.name,
            projection=convs_in_branch[0].target if convs_in_branch else None,
            projection_norm=norms_in_branch[0].target if norms_in_branch else None,
            projection_stride=(ops.module_of(gm, convs_in_branch[0]).stride[0]
                               if convs_in_branch else 1),
        ))
        first = sk.branch[-1] if sk.branch else nodes[u.add]
        skip_users.setdefault(sk.source.name, set()).add(first.name)

    breaks = set()
    for p in range(1, L):
        prev, nxt = units[p - 1], units[p]
        if nxt.input != prev.output:
            breaks.add(p)
            continue
        allowed = {nxt.conv, *nxt.region} | skip_users.get(prev.output, set())
        if any(user.name not in allowed for user in nodes[prev.output].users):
            breaks.add(p)
    for p, u in enumerate(units):
        # the value feeding a region's first conv must not feed anything unknown either
        allowed = {u.conv, *u.region} | skip_users.get(u.input, set())
        if p > 0 and any(user.name not in allowed for user in nodes[u.input].users):
            breaks.add(p)

    convs = []
    for p, (node, u) in enumerate(zip(conv_nodes, units), start=1):
        region = regions.get(node.name)
        m = ops.module_of(gm, node) if region is None else _RegionConv(collapse(gm, region))
        convs.append(Conv(
            index=p, name=region.name if region else node.target, node=node.name,
            in_channels=m.in_channels, out_channels=m.out_channels,
            kernel=m.kernel_size[0], stride=m.stride[0], padding=m.padding[0],
            dilation=m.dilation[0], groups=m.groups, bias=m.bias is not None,
            norm=nodes[u.norm].target if u.norm else None,
            activation=ops.activation_kind(gm, nodes[u.act]) if u.act else None,
            in_shape=ops.tensor_shape(nodes[u.input]), out_shape=ops.tensor_shape(node),
            relocatable_norm=nodes[u.rnorm].target if u.rnorm else None,
            activation_module=nodes[u.act].target if u.act else None,
            score=float(m.weight.detach().abs().sum()),
        ))
    for c in convs:
        if stride_rule == "paper" and c.stride > 1 and c.index < L:
            follower = convs[c.index]
            one_by_one = follower.kernel == 1 and c.index not in breaks
            breaks.add(c.index + 1 if one_by_one else c.index)
    breaks.discard(L)

    return MergeSpace(convs, units, skips, breaks, _graph_nodes(gm, in_regions), stride_rule,
                      exclude, {n: why for n, why in left_out.items() if why != "excluded"},
                      add_activations, max_kernel_bytes, capture_path(gm),
                      [tuple(x.shape[1:]) if isinstance(x, Tensor) else ()
                       for x in example_inputs(gm)], regions.values())


class _RegionConv:
    """A collapsed region read as the conv it is (the fields `analyze` reads of a conv)."""

    def __init__(self, affine) -> None:
        self.in_channels, self.out_channels = affine.in_channels, affine.out_channels
        self.kernel_size, self.stride = (affine.kernel,), (affine.stride,)
        self.padding, self.dilation = (affine.padding,), (affine.dilation,)
        self.groups, self.bias, self.weight = affine.groups, affine.bias, affine.weight
