"""A readable before/after listing of what a pass removed, replaced and created."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..capture import ops, require_graph_module
from ..sides import label


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, ops.CONVS):
            g = f" g{m.groups}" if m.groups > 1 else ""
            d = f" d{label(m.dilation)}" if max(m.dilation) > 1 else ""
            return (f"{node.target}: {type(m).__name__} {m.in_channels}->{m.out_channels} "
                    f"{'x'.join(map(str, m.kernel_size))} s{label(m.stride)} "
                    f"p{m.padding if isinstance(m.padding, str) else label(m.padding)}"
                    f"{d}{g}")
        return f"{node.target}: {type(m).__name__}"
    if node.op == "call_function":
        return f"{node.name}: {getattr(node.target, '__name__', node.target)}"
    return f"{node.name}: {node.op} {node.target}"


@dataclass(frozen=True)
class GraphDiff:
    """Node-level differences, each entry a readable description."""

    removed: tuple[str, ...]
    created: tuple[str, ...]
    replaced: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"- {d}" for d in self.removed]
        lines += [f"~ {a}  =>  {b.split(': ', 1)[1]}" for a, b in self.replaced]
        lines += [f"+ {d}" for d in self.created]
        lines.append(f"{len(self.removed)} removed, {len(self.replaced)} replaced, "
                     f"{len(self.created)} created")
        return "\n".join(lines)


def diff(before: fx.GraphModule, after: fx.GraphModule) -> GraphDiff:
    """What changed from `before` to `after`, keyed by the module (or function) each node
    calls: a conv whose shape or padding changed is 'replaced'."""
    def described(gm: fx.GraphModule) -> dict[str, str]:
        keyed = {}
        for n in gm.graph.nodes:
            if n.op in ("call_module", "call_function", "call_method"):
                key = n.target if n.op == "call_module" else n.name
                keyed.setdefault(key, []).append(_describe(gm, n))
        return {f"{k}#{i}": d for k, ds in keyed.items() for i, d in enumerate(ds)}

    require_graph_module(before, "diff")
    require_graph_module(after, "diff")
    a, b = described(before), described(after)
    removed = tuple(a[k] for k in a if k not in b)
    created = tuple(b[k] for k in b if k not in a)
    replaced = tuple((a[k], b[k]) for k in a if k in b and a[k] != b[k])
    return GraphDiff(removed, created, replaced)
