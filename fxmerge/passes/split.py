"""A graph of several submodules (a `capture.submodules.Bundle`, captured, pruned or
merged) split back into one GraphModule per submodule, each taking that submodule's inputs
and returning its output in the submodule's own structure (a tensor, a tuple, a dict)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from operator import attrgetter

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_unflatten

from ..capture.ops import ancestors
from ..capture.trace import INPUTS_META, example_inputs
from ..plan import Plan
from .base import PLAN_META


def _flat_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's output nodes, flattened in order."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]


def split(gm: fx.GraphModule, prefixes: Sequence[str], arity: Sequence[int],
          outputs: Sequence[TreeSpec]) -> list[fx.GraphModule]:
    """One GraphModule per submodule of the bundle graph `gm`: the i-th takes the bundle's
    inputs `arity[i]` at a time, in order, and returns its flattened outputs (`outputs[i]`
    leaves each) unflattened by `outputs[i]`; its modules and attributes are those of `gm`
    under `prefixes[i]` (a submodule's attribute in the bundle, with its dot), renamed
    without it. Node metadata (shapes, families), the example inputs and the blocks of a
    pruning plan (those inside the part, renamed) are kept."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = _flat_outputs(gm)
    inputs = example_inputs(gm)
    parts, at_in, at_out = [], 0, 0
    for prefix, n_in, spec in zip(prefixes, arity, outputs):
        mine_in = placeholders[at_in:at_in + n_in]
        mine_out = leaves[at_out:at_out + spec.num_leaves]
        graph, env, root = fx.Graph(), {}, {}
        needed = set(mine_out).union(*(ancestors(n) for n in mine_out))
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node in mine_in:
                env[node] = graph.placeholder(node.name)
                env[node].meta = dict(node.meta)
            elif node in needed and node.op not in ("placeholder", "output"):
                copied = graph.node_copy(node, env.__getitem__)
                if node.op in ("call_module", "get_attr"):
                    copied.target = node.target.removeprefix(prefix)
                    root[copied.target] = attrgetter(node.target)(gm)
                env[node] = copied
        graph.output(tree_unflatten([env[n] for n in mine_out], spec))
        part = fx.GraphModule(root, graph)
        part.meta = {k: v for k, v in gm.meta.items() if k not in (INPUTS_META, PLAN_META)}
        part.meta[INPUTS_META] = tuple(inputs[at_in:at_in + n_in])
        if PLAN_META in gm.meta:
            part.meta[PLAN_META] = _part_plan(gm.meta[PLAN_META], prefix)
        part.train(gm.training)
        parts.append(part)
        at_in, at_out = at_in + n_in, at_out + spec.num_leaves
    return parts


def _part_plan(plan: Plan, prefix: str) -> Plan:
    """The blocks of `plan` whose convs lie under `prefix`, named without it."""
    blocks = tuple(replace(b, convs=tuple(c.removeprefix(prefix) for c in b.convs),
                           kept=tuple(c.removeprefix(prefix) for c in b.kept))
                   for b in plan.blocks if all(c.startswith(prefix) for c in b.convs))
    return replace(plan, blocks=blocks)
