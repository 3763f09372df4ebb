"""`MergeSpace`: the frozen plain data of one analysed graph, and what follows from it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

from torch import fx

from ..capture import require_graph_module
from ..capture.regions import Branch, Region
from ..capture.registry import NodeKind
from ..errors import ArgumentError, SpaceError
from ..sides import per_axis
from . import kernels, report
from .records import (
    IDENTITY,
    MAX_KERNEL_BYTES,
    Conv,
    Entry,
    GraphNode,
    KernelOption,
    MergedConv,
    Skip,
    StrideRule,
    Unit,
)


@dataclass(frozen=True, eq=False)
class MergeSpace:
    """Convs, skips, breaks, legal blocks and table entries of one traced graph: frozen
    plain data (no module, no weights), saved with `to_json` and compared with `==`."""

    convs: tuple[Conv, ...]
    units: tuple[Unit, ...]  # each conv's FX nodes
    skips: tuple[Skip, ...]
    breaks: frozenset[int]  # positions no block may span
    nodes: tuple[GraphNode, ...]  # the analysed graph, as plain data
    stride_rule: StrideRule = StrideRule.PAPER
    exclude: tuple[str, ...] = ()
    left_out: Mapping[str, str] = field(default_factory=dict)  # convs not searched, and why
    # an activation after merged blocks of several convs that end without one; None:
    # decided from the graph (on, except where GroupNorms precede the activations)
    add_activations: bool | None = False
    max_kernel_bytes: int = MAX_KERNEL_BYTES
    capture: str = "unknown"  # how the graph was captured (`capture_path`)
    input_shapes: tuple[tuple[int, ...], ...] = ()  # the example inputs', batch aside
    regions: tuple[Region, ...] = ()  # each one position named after its largest conv

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("convs", "units", "skips", "nodes", "regions"):
            set_(self, name, tuple(getattr(self, name)))
        set_(self, "breaks", frozenset(self.breaks))
        set_(self, "stride_rule", StrideRule(self.stride_rule))
        set_(self, "exclude", tuple(sorted(self.exclude)))
        set_(self, "left_out", dict(self.left_out))
        set_(self, "input_shapes", tuple(tuple(s) for s in self.input_shapes))
        requested = self.add_activations
        if requested is None:  # as the authors: not where GroupNorms precede them
            requested = not any(c.relocatable_norm for c in self.convs)
        # on only where it changes something: a block of several convs ending without one
        set_(self, "add_activations", bool(requested) and self.added_activation is not None
             and any(j - i >= 2 and self.activation(j) is None for i, j in self.blocks))

    # ---- plain data ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON-ready data (blocks and entries follow from them)."""
        data = asdict(self)
        data["breaks"] = sorted(self.breaks)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeSpace:
        """The space `to_dict` wrote; `SpaceError` for anything else."""
        try:
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in data.items() if k in known}
            values["convs"] = [Conv(**{**c, "in_shape": tuple(c["in_shape"]),
                                       "out_shape": tuple(c["out_shape"])})
                               for c in data["convs"]]
            values["units"] = [Unit(**{**u, "region": tuple(u.get("region", ()))})
                               for u in data["units"]]
            values["skips"] = [Skip(**s) for s in data["skips"]]
            values["nodes"] = [GraphNode(**{**n, "kind": NodeKind(n["kind"]),
                                            "inputs": tuple(n["inputs"])})
                               for n in data["nodes"]]
            values["regions"] = [Region(**{
                **r, "nodes": tuple(r["nodes"]), "padding": per_axis(  # one int before
                    r["padding"], len(r["branches"][0]["padding"])),
                "branches": tuple(Branch(**{**b, "padding": tuple(b["padding"])})
                                  for b in r["branches"])})
                for r in data.get("regions", ())]
            return cls(**values)
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

    def __repr__(self) -> str:
        return (f"MergeSpace(L={self.L}, blocks={self.num_blocks}, entries={self.num_entries}, "
                f"skips={len(self.skips)}, stride_rule={self.stride_rule.value!r})")

    # ---- blocks and entries ----------------------------------------------------------------
    @cached_property
    def _blocks(self) -> kernels.Blocks:
        return kernels.enumerate_blocks(self)

    @property
    def L(self) -> int:
        return len(self.convs)

    @property
    def irreducible(self) -> frozenset[int]:
        return frozenset(c.index for c in self.convs if c.irreducible)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._blocks.options)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks.options)

    @property
    def oversized(self) -> frozenset[tuple[int, int]]:
        """Blocks whose every kernel option is over `max_kernel_bytes`."""
        return self._blocks.oversized

    @property
    def over_bound(self) -> int:
        """How many kernel options `max_kernel_bytes` left out."""
        return self._blocks.over_bound

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(Entry(i, j, opt.kernel, opt.depthwise)
                     for (i, j), opts in self._blocks.options.items() for opt in opts)

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def kernel_options(self, i: int, j: int) -> tuple[KernelOption, ...]:
        """`K_ij`: the (kernel, depthwise) pairs reachable in block `(i, j)`; () if illegal."""
        return self._blocks.options.get((i, j), ())

    def merged_conv(self, entry: Entry) -> MergedConv:
        """The conv entry `(i, j, k, dw)` merges into (where subsets of the block's convs
        reach the same `k` on different lattices or groups, the largest of them); an identity
        entry makes no conv (kernel 0, no bytes)."""
        if (entry.k, entry.dw) == IDENTITY:
            return MergedConv(0, 1, 1, 0)
        return self._blocks.merged[entry]

    @cached_property
    def full_entries(self) -> dict[tuple[int, int], Entry]:
        """Every legal block's entry with all its convs kept (what Depth merges; for one
        conv, the entry that leaves it as it is)."""
        full = {(i, j): Entry(i, j, *kernels.kernel_of(self, range(i + 1, j + 1)))
                for i, j in self._blocks.options}
        return {block: e for block, e in full.items() if e in self._blocks.merged}

    # ---- convs and positions ---------------------------------------------------------------
    @cached_property
    def _by_name(self) -> dict[str, Conv]:
        return {c.name: c for c in self.convs}

    def conv(self, name_or_index: str | int) -> Conv:
        """The conv at a position (1-based) or of a module name; `SpaceError` if none."""
        if isinstance(name_or_index, int):
            if 1 <= name_or_index <= self.L:
                return self.convs[name_or_index - 1]
        elif name_or_index in self._by_name:
            return self._by_name[name_or_index]
        raise SpaceError(f"no searched conv {name_or_index!r} in this space")

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
        `add_activations`, the added one after a block of several convs that ends at a
        normalised conv the network leaves linear (a projection; a conv with neither norm
        nor activation is a prediction layer, and gets none: docs/method.md §4)."""
        if (self.activation(j) is None and self.add_activations and j - i >= 2
                and self.convs[j - 1].norm is not None):
            return self.added_activation
        return self.activation(j)

    def input_shape(self, p: int) -> tuple[int, ...]:
        """Shape of the value at position `p`, as the conv after it sees it."""
        if p < self.L:
            return self.convs[p].in_shape
        return self.convs[-1].out_shape

    @cached_property
    def conv_scores(self) -> dict[str, float]:
        """Eq. 3's score of each conv: the l1 norm of its weight, recorded at analysis."""
        return {c.name: c.score for c in self.convs}

    @property
    def barriers(self) -> tuple[str, ...]:
        """The nodes the search never merges through."""
        return tuple(n.name for n in self.nodes if n.kind is NodeKind.BARRIER)

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
        text += f"|{self.stride_rule.value}"
        if self.regions:  # the same convs, read as regions or not, prune differently
            text += f"|regions={[r.name for r in self.regions]}"
        if self.add_activations:  # latency entries and pruned networks differ with it
            text += "|add_activations"
        if self._blocks.over_bound:  # the bound left entries out
            text += f"|max_kernel_bytes={self.max_kernel_bytes}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """A readable table of the searched convs and the size of the space
        (`fxmerge.space.report`)."""
        return report.summary(self)


def require_space_of(space: MergeSpace, gm: fx.GraphModule, who: str) -> None:
    """`ArgumentError` unless `gm` is a GraphModule and `space` a MergeSpace; `SpaceError`
    unless `space` was analysed from `gm` (or a copy of it), naming the first node that
    differs. The one wording of these mistakes for every entry point `who` given both."""
    require_graph_module(gm, who)
    if not isinstance(space, MergeSpace):
        raise ArgumentError(f"{who} needs a MergeSpace from fxmerge.analyze, got "
                            f"{type(space).__name__}")
    if not space.describes(gm):
        names = {n.name for n in gm.graph.nodes}
        differ = next((n.name for n in space.nodes if n.name not in names), None)
        where = f"no node '{differ}' in the graph" if differ else "its nodes differ"
        raise SpaceError(f"the space was analysed from another graph ({where}): analyse "
                         "this graph, or pass the graph the space came from")
