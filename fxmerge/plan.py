"""Plan: which convs and activations a compressed network keeps, by module name."""

from __future__ import annotations

import fnmatch
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .capture import check_canonical, require_graph_module
from .capture.registry import NodeKind
from .errors import ArgumentError, PlanError, SpaceError
from .sides import Sides, compact, label
from .space import (
    MAX_KERNEL_BYTES,
    MergeSpace,
    StrideRule,
    analyze,
    kernel_of,
    merge_peak_bytes,
)

PLAN_FORMAT = 2  # 2: `Block.activation` says whether an activation follows, added ones too


@dataclass(frozen=True)
class Block:
    """Convs `convs` (consecutive, by module name) merged into one conv of `kernel` (its
    extent per axis, `fxmerge.sides`).

    A block that keeps no conv is the identity (kernel 0; LayerOnly's removed layers).
    `activation`: whether an activation follows the block: the network's own, or, where the
    network has none, the added one (`add_activations`, docs/method.md §4). False where the
    network has one removes it (Depth splits a block without activations into several convs).
    """

    convs: tuple[str, ...]
    kept: tuple[str, ...]
    kernel: Sides
    depthwise: bool
    activation: bool = True


def _kernel(space: MergeSpace, kept) -> tuple[Sides, bool]:
    """(kernel, depthwise) of a block keeping these convs; (0, False) for the identity."""
    if not kept:
        return 0, False
    opt = kernel_of(space, (space.conv(n).index for n in kept))
    return opt.kernel, opt.depthwise


def _merged_bytes(space: MergeSpace, i: int, kept) -> int:
    """The most merging a block starting at `i` that keeps these convs materialises (0 for
    one conv or none: a conv the plan leaves as it is is never composed)."""
    return merge_peak_bytes(space, i, (space.conv(n).index for n in kept))


@dataclass(frozen=True)
class Plan:
    """Blocks tiling the searched convs. Activations are kept at block ends, removed inside."""

    blocks: tuple[Block, ...]
    signature: str
    stride_rule: StrideRule = StrideRule.PAPER
    exclude: tuple[str, ...] = ()
    add_activations: bool = False
    max_kernel_bytes: int = MAX_KERNEL_BYTES
    method: str = "manual"
    budget: float | None = None
    budget_ms: float | None = None
    predicted_latency_ms: float | None = None
    predicted_importance: float | None = None
    extra: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)  # `solve_measured`: the network as timed
    input_shapes: tuple[tuple[int, ...], ...] = ()  # the space's, batch aside
    # a plan for submodules of a model (`compress(..., submodule=)`): each one's name, in
    # the order they were captured together, with its inputs ({"shape", "dtype"} each)
    submodules: dict[str, list[dict]] = field(default_factory=dict)

    # ---- derived views --------------------------------------------------------------
    @property
    def kept_convs(self) -> tuple[str, ...]:
        return tuple(name for b in self.blocks for name in b.kept)

    @property
    def removed_convs(self) -> tuple[str, ...]:
        return tuple(n for b in self.blocks for n in b.convs if n not in b.kept)

    def removed_activations(self, space: MergeSpace) -> tuple[str, ...]:
        """Convs after which the network's activation is removed: inside blocks, and at the
        end of blocks that drop it."""
        return tuple(n for b in self.blocks
                     for n in (b.convs if not b.activation else b.convs[:-1])
                     if space.conv(n).activation is not None)

    def added_activations(self, space: MergeSpace) -> tuple[str, ...]:
        """Convs after which the plan adds an activation the network lacks there."""
        return tuple(b.convs[-1] for b in self.blocks
                     if b.activation and space.conv(b.convs[-1]).activation is None)

    def positions(self, space: MergeSpace) -> list[tuple[int, int]]:
        """Each block as positions `(i, j)` of `space`."""
        return [(space.conv(b.convs[0]).index - 1, space.conv(b.convs[-1]).index)
                for b in self.blocks]

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_positions(cls, space: MergeSpace, positions, kept: set[str], *,
                       activation: Mapping[int, bool] | None = None, **info) -> Plan:
        """A plan from its blocks' positions `(i, j)` and the set of kept conv names. A
        block ending at `j` has an activation as `activation[j]` says, else as
        `space.end_activation`."""
        blocks, activation = [], activation or {}
        for i, j in positions:
            convs = tuple(c.name for c in space.convs[i:j])
            kept_here = tuple(n for n in convs if n in kept)
            k, dw = _kernel(space, kept_here)
            act = activation.get(j, space.end_activation(i, j) is not None)
            blocks.append(Block(convs, kept_here, k, dw, act))
        return cls(tuple(blocks), space.signature, space.stride_rule, space.exclude,
                   space.add_activations, space.max_kernel_bytes, **info,
                   input_shapes=space.input_shapes)

    @classmethod
    def identity(cls, space: MergeSpace) -> Plan:
        """Keep every conv and activation: transform gives the original network, BN folded."""
        positions = [(p - 1, p) for p in range(1, space.L + 1)]
        return cls.from_positions(space, positions, {c.name for c in space.convs},
                                  method="identity")

    @classmethod
    def random(cls, space: MergeSpace, seed: int = 0) -> Plan:
        """A random legal plan (for tests): random block ends, random reducible convs kept."""
        rng = random.Random(seed)
        positions, kept, i = [], set(), 0
        while i < space.L:
            j = rng.choice([j for (a, j) in space.blocks if a == i])
            convs = space.convs[i:j]
            chosen = {c.name for c in convs if c.irreducible or rng.random() < 0.5}
            if not chosen:
                chosen = {rng.choice(convs).name}
            if _merged_bytes(space, i, chosen) > space.max_kernel_bytes:
                j, chosen = i + 1, {space.convs[i].name}  # over the bound: this conv alone
            kept |= chosen
            positions.append((i, j))
            i = j
        return cls.from_positions(space, positions, kept, method=f"random:{seed}")

    @property
    def analysis(self) -> dict[str, Any]:
        """The `analyze` options the plan's space was analysed with."""
        return {"stride_rule": self.stride_rule, "exclude": self.exclude,
                "add_activations": self.add_activations,
                "max_kernel_bytes": self.max_kernel_bytes}

    def space_of(self, gm) -> MergeSpace:
        """The space of `gm` analysed with this plan's settings: the one it was made on, if
        it was made for this graph (pass that space around instead, where you have it)."""
        require_graph_module(gm, "Plan.space_of")
        check_canonical(gm)  # the graph's own mistake, said as everywhere (TraceError)
        try:
            return analyze(gm, **self.analysis)
        except (SpaceError, ArgumentError) as exc:  # its settings do not fit this graph
            raise PlanError(f"plan was made for another graph: {exc}") from None

    # ---- checks ----------------------------------------------------------------------
    def _what_differs(self, space: MergeSpace) -> str:
        """Why this plan's signature is not `space`'s, and only what could help."""
        if self.input_shapes and self.input_shapes != space.input_shapes:
            return (f"the input shape differs (the plan's {list(self.input_shapes)}, this "
                    f"graph's {list(space.input_shapes)}, batch aside): trace the model at "
                    "the plan's input shape, or solve again at this one")
        convs = {n.target for n in space.nodes if n.kind is NodeKind.CONV}
        foreign = [n for b in self.blocks for n in b.convs if n not in convs]
        if foreign:
            return (f"the plan names convs this model does not have ({foreign[0]!r} of "
                    f"{len(foreign)}): it is another model's plan; solve on this one")
        settings = {k: v for k, v in (("stride_rule", self.stride_rule),
                                      ("exclude", list(self.exclude)),
                                      ("add_activations", self.add_activations),
                                      ("max_kernel_bytes", self.max_kernel_bytes))
                    if v != getattr(space, k) and not (k == "exclude"
                                                       and v == list(space.exclude))}
        if settings:
            return ("the plan was solved on a space analysed with "
                    + ", ".join(f"{k}={v!r}" for k, v in settings.items())
                    + ": analyse with those, or solve on this space")
        return ("the model's structure differs (the same convs by name, but other shapes, "
                "skips or barriers): solve on this model")

    def validate(self, space: MergeSpace) -> None:
        """Raise `PlanError` unless this plan fits `space` and obeys every merge rule."""
        if self.signature != space.signature:
            raise PlanError(f"plan was made for another graph (signature {self.signature}, "
                            f"this graph {space.signature}): {self._what_differs(space)}")
        names = [c.name for c in space.convs]
        covered = [n for b in self.blocks for n in b.convs]
        if covered != names:
            raise PlanError("plan blocks do not tile the searched convs in order")
        for b, (i, j) in zip(self.blocks, self.positions(space)):
            if not space.kernel_options(i, j) and (i, j) not in space.oversized:
                raise PlanError(
                    f"block {b.convs[0]}..{b.convs[-1]} (positions {i}..{j}) is not legal: "
                    "it crosses a barrier, a stride break or half a residual segment")
            missing = [c.name for c in space.convs[i:j] if c.irreducible and c.name not in b.kept]
            if missing:
                raise PlanError(f"plan removes irreducible conv(s) {missing}")
            unknown = set(b.kept) - set(b.convs)
            if unknown:
                raise PlanError(f"block {b.convs[0]}..{b.convs[-1]} keeps {sorted(unknown)}")
            if list(b.kept) != [n for n in b.convs if n in b.kept]:
                raise PlanError(f"block {b.convs[0]}..{b.convs[-1]}: 'kept' must list its "
                                "convs once each, in network order")
            if b.activation and space.activation(j) is None and not space.add_activations:
                raise PlanError(f"block {b.convs[0]}..{b.convs[-1]} adds an activation after "
                                f"{b.convs[-1]}, where the network has none, but the plan's "
                                "add_activations is off")
            size = _merged_bytes(space, i, b.kept)
            if size > self.max_kernel_bytes:
                raise PlanError(f"block {b.convs[0]}..{b.convs[-1]} would materialise a kernel "
                                f"of {size} bytes to merge, over max_kernel_bytes="
                                f"{self.max_kernel_bytes}")
            if (b.kernel, b.depthwise) != _kernel(space, b.kept):
                k, dw = _kernel(space, b.kept)
                raise PlanError(
                    f"block {b.convs[0]}..{b.convs[-1]} states kernel {b.kernel} "
                    f"(dw={b.depthwise}) but its kept convs give {k} (dw={dw})")

    # ---- JSON ------------------------------------------------------------------------
    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan; anything but a well-formed plan raises `PlanError` saying what."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"not a fxmerge plan: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PlanError(f"not a fxmerge plan: expected a JSON object, got {data!r:.40}")
        raw_blocks = _typed(data, "blocks", list)
        if not raw_blocks or not all(isinstance(b, dict) for b in raw_blocks):
            raise PlanError("not a fxmerge plan: 'blocks' must be a non-empty list of objects")
        if data.get("format", 1) != PLAN_FORMAT:
            raise PlanError(f"plan is in format {data.get('format', 1)!r:.20}, this fxmerge "
                            f"reads format {PLAN_FORMAT} (format 1 did not record the "
                            "activations it added): solve again")
        blocks = tuple(Block(_names(b, "convs"), _names(b, "kept"), _kernel_field(b),
                             _typed(b, "depthwise", bool),
                             _typed(b, "activation", bool))
                       for b in raw_blocks)
        number = (int, float, type(None))
        try:
            return cls(
                blocks=blocks, signature=_typed(data, "signature", str),
                stride_rule=StrideRule(_typed(data, "stride_rule", str, default="paper")),
                exclude=_names(data, "exclude", default=()),
                add_activations=_typed(data, "add_activations", bool, default=False),
                max_kernel_bytes=_typed(data, "max_kernel_bytes", int,
                                        default=MAX_KERNEL_BYTES),
                method=_typed(data, "method", str, default="manual"),
                budget=_typed(data, "budget", number, default=None),
                budget_ms=_typed(data, "budget_ms", number, default=None),
                predicted_latency_ms=_typed(data, "predicted_latency_ms", number, default=None),
                predicted_importance=_typed(data, "predicted_importance", number, default=None),
                extra=_typed(data, "extra", dict, default={}),
                measured=_typed(data, "measured", dict, default={}),
                input_shapes=tuple(tuple(shape) for shape in
                                   _typed(data, "input_shapes", list, default=[])),
                submodules=_submodules(data))
        except (TypeError, ValueError) as exc:
            raise PlanError(f"not a fxmerge plan: {exc}") from None

    def restrict(self, space: MergeSpace) -> Plan:
        """This plan's blocks over the convs of `space`, a part of the graph it was made for
        (a subgraph between torch.compile graph breaks); `PlanError` unless they tile it."""
        names = {c.name for c in space.convs}
        blocks = tuple(b for b in self.blocks if names & set(b.convs))
        split = [b for b in blocks if not set(b.convs) <= names]
        if split:
            raise PlanError(f"block {split[0].convs[0]}..{split[0].convs[-1]} is not within this "
                            "graph: the plan was made for another graph, or it is split between "
                            "graphs (a torch.compile graph break inside the block)")
        plan = replace(self, blocks=blocks, signature=space.signature,
                       exclude=tuple(p for p in self.exclude if any(
                           fnmatch.fnmatchcase(c.name, p) for c in space.convs) or p in
                           space.left_out or p in space.exclude))
        plan.validate(space)
        return plan

    def describe(self) -> str:
        """One line per block: its convs, what is kept, the merged kernel."""
        def num(value: float | None, unit: str = "") -> str:
            return "-" if value is None else f"{value:.4g}{unit}"

        budget = "-" if self.budget is None else f"{self.budget:.1%}"
        header = (f"plan ({self.method}, budget {budget}, predicted "
                  f"{num(self.predicted_latency_ms, ' ms')}, importance "
                  f"{num(self.predicted_importance)})")
        lines = [header]
        if self.measured:
            m = self.measured
            lines.append(f"  measured ({m.get('backend')}, batch {m.get('batch_size')}, "
                         f"{m.get('threads')} threads): "
                         f"{m.get('ratio', float('nan')):.1%} of the original's "
                         f"{m.get('original_ms', float('nan')):.4g} ms (budget {self.budget:.0%}, "
                         f"predicted {m.get('predicted_ratio', float('nan')):.1%})")
        for b in self.blocks:
            span = b.convs[0] if len(b.convs) == 1 else f"{b.convs[0]} .. {b.convs[-1]}"
            k = f"{b.kernel}x{b.kernel}" if isinstance(b.kernel, int) else label(b.kernel)
            merged = f"{k}{' dw' if b.depthwise else ''}" if b.kept else "identity"
            act = "" if b.activation else ", no activation after"
            lines.append(f"  {span:<50} keep {len(b.kept)}/{len(b.convs)} -> {merged}{act}")
        return "\n".join(lines)


_MISSING = object()


def _kernel_field(data: dict) -> Sides:
    """A block's `kernel`: an int, or a list of one int per axis."""
    value = _typed(data, "kernel", (int, list))
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise PlanError(f"plan field 'kernel' must be an int or a list of ints, "
                            f"got {value!r:.40}")
        return compact(value)
    return value


def _typed(data: dict, key: str, types: type | tuple[type, ...], default: Any = _MISSING):
    """`data[key]` if it has one of `types` (a bool is not a number), else `PlanError`."""
    if key not in data:
        if default is _MISSING:
            raise PlanError(f"not a fxmerge plan: missing {key!r}")
        return default
    value = data[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise PlanError(f"plan field {key!r} must be {wanted}, got {value!r:.40}")
    return value


def _submodules(data: dict) -> dict[str, list[dict]]:
    """`data["submodules"]`: submodule names, each with a list of {"shape", "dtype"}."""
    value = _typed(data, "submodules", dict, default={})
    for name, specs in value.items():
        if not isinstance(specs, list) or not all(
                isinstance(s, dict) and isinstance(s.get("shape"), list)
                and isinstance(s.get("dtype"), str) for s in specs):
            raise PlanError(f"plan field 'submodules': {name!r} must list its inputs as "
                            '{"shape": [...], "dtype": "..."}')
    return value


def _names(data: dict, key: str, default: Any = _MISSING) -> tuple[str, ...]:
    """`data[key]` as a tuple of module names."""
    value = _typed(data, key, list, default=default)
    if not all(isinstance(v, str) for v in value):
        raise PlanError(f"plan field {key!r} must be a list of module names, got {value!r:.40}")
    return tuple(value)
