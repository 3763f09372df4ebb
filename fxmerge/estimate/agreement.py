"""The output-agreement importance proxy: how far each candidate moves the network's output.

No fine-tuning and no labels. `OutputAgreement` scores any network against the original on a
calibration batch (an `evaluate` for `estimate_importance`). `agreement_importance` builds
the whole table that way but far faster: each key's change is `prune_graph`'s window (the
nodes it edits, sharing the original's modules), run on the original's values; the rest of
the network after it is run once for all the keys whose windows end at the same node,
stacked on the batch dimension.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..capture.trace import ExampleInputs, as_tuple
from ..errors import TableError
from ..passes.prune import PrunedGraph, prune_graph
from ..progress import progress as iterate
from ..recipes import relative_squared_error
from ..solve import probes
from ..space import MergeSpace, require_space_of
from ..tables import ImportanceSettings, ImportanceTable, Key


class OutputAgreement:
    """An `evaluate` that needs no training or labels: minus the relative squared error
    between a network's output and the original's on a calibration batch. It ranks blocks
    by how much they change the function, not by task accuracy."""

    def __init__(self, original: nn.Module, batch: ExampleInputs) -> None:
        self.batch = as_tuple(batch)  # the inputs of one call: (x,) or (x, t)
        with torch.no_grad():
            self.reference = copy.deepcopy(original).eval()(*self.batch)

    def __call__(self, model: nn.Module) -> float:
        with torch.no_grad():
            return -relative_squared_error(model.eval()(*self.batch), self.reference)


class _Run(fx.Interpreter):
    """Runs `graph` on `module`'s attributes (looked up once, in `attrs`), but for those
    `replaced` (a `PrunedGraph`'s own modules)."""

    def __init__(self, module: fx.GraphModule, graph: fx.Graph, attrs: dict[str, Any],
                 replaced: dict[str, nn.Module] | None = None) -> None:
        super().__init__(module, graph=graph)
        self.attrs, self.replaced = attrs, replaced or {}

    def fetch_attr(self, target: str) -> Any:
        if target in self.replaced:
            return self.replaced[target]
        if target not in self.attrs:
            self.attrs[target] = super().fetch_attr(target)
        return self.attrs[target]


@dataclass
class Cut:
    """Where a variant's own computation ends: from node `index` of the original graph on,
    it computes what the original does, on `values` (the live values there, by node name).
    `output` instead when the variant changes nothing."""

    index: int
    values: dict[str, Any] = field(default_factory=dict)
    output: Any = None


SUFFIX_BATCH = 32  # samples run through one shared suffix at once


class CachedOutputs:
    """The original graph's value at every node on one batch, and the output of plans
    applied to it (`prune_graph`'s windows) computing only what can differ.

    A window runs on the original's values; past it the rest is the original's graph:
    windows that end at the same node run that rest once, stacked on the batch dimension
    (`outputs`), where the graph is checked to keep samples apart. Memory: one forward's
    activations."""

    def __init__(self, gm: fx.GraphModule, batch: ExampleInputs) -> None:
        self.gm = gm
        self.batch = as_tuple(batch)
        self.order = list(gm.graph.nodes)
        self.nodes = {n.name: n for n in self.order}
        recorder = fx.Interpreter(gm, garbage_collect_values=False)  # keeps every value
        with torch.no_grad():
            self.output = recorder.run(*self.batch)
        self.values = {n.name: v for n, v in recorder.env.items()}
        self.attrs: dict[str, Any] = {}  # the original's modules and tensors, by target
        self._live: dict[int, list[str]] = {}
        self._batchable: bool | None = None

    def cut(self, variant: PrunedGraph) -> Cut:
        """Run `variant`'s window on the original's values; what the rest then reads."""
        if variant.stop == 0:  # nothing edited
            return Cut(len(self.order), output=self.output)
        with torch.no_grad():
            out = _Run(self.gm, variant.graph, self.attrs, variant.modules).run(
                *(self.values[name] for name in variant.inputs))
        values = dict(zip(variant.outputs, out))
        return Cut(variant.stop, {name: values[name] if name in values else self.values[name]
                                  for name in self._needs(variant.stop)})

    def _needs(self, index: int) -> list[str]:
        """The nodes before `index` that a node from `index` on reads."""
        if index not in self._live:
            read = {n.name for node in self.order[index:] for n in node.all_input_nodes}
            self._live[index] = [n.name for n in self.order[:index] if n.name in read]
        return self._live[index]

    def outputs(self, cuts: list[Cut]) -> list[Any]:
        """The outputs of variants cut at the same node: the original's suffix run once on
        their values stacked (where the graph keeps samples apart), else each alone."""
        if cuts[0].index == len(self.order):
            return [c.output for c in cuts]
        size = self.batch[0].shape[0]
        stackable = all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size
                        for c in cuts for v in c.values.values())
        if len(cuts) == 1 or not stackable or not self.batchable():
            return [self._suffix(c.index, c.values) for c in cuts]
        stacked = {name: torch.cat([c.values[name] for c in cuts]) for name in cuts[0].values}
        out = self._suffix(cuts[0].index, stacked)
        return [tree_map(lambda t, k=k: t[k * size:(k + 1) * size]
                         if isinstance(t, torch.Tensor) else t, out)
                for k in range(len(cuts))]

    def _suffix(self, index: int, values: dict[str, Any]) -> Any:
        runner = _Run(self.gm, self.gm.graph, self.attrs)
        runner.env = {self.nodes[name]: v for name, v in values.items()}
        with torch.no_grad():
            for node in self.order[index:]:
                value = runner.run_node(node)
                if node.op == "output":
                    return value
                runner.env[node] = value
                for used in runner.user_to_last_uses.get(node, ()):
                    runner.env.pop(used, None)
        raise TableError("the graph has no output node")

    def batchable(self) -> bool:
        """Whether the graph computes each sample on its own: the batch stacked with a
        second, different one gives each one's output (checked once)."""
        if self._batchable is None:
            other = tuple(-x if x.is_floating_point() else x for x in self.batch)
            self._batchable = False
            try:
                with torch.no_grad():
                    both = self.gm(*(torch.cat([a, b]) for a, b in zip(self.batch, other)))
                    alone = [self.output, self.gm(*other)]
            except Exception:  # noqa: BLE001  (a graph that fixes its batch size)
                return False
            size = self.batch[0].shape[0]
            pairs = list(zip(tree_leaves(both), tree_leaves(alone[0]), tree_leaves(alone[1])))
            self._batchable = bool(pairs) and all(
                isinstance(t, torch.Tensor) and t.shape[0] == 2 * size
                and torch.allclose(t[:size], a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
                and torch.allclose(t[size:], b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
                for t, a, b in pairs)
        return self._batchable

    def run(self, variant: PrunedGraph) -> Any:
        """`variant`'s output on the batch (in the original's mode: eval for importance)."""
        return self.outputs([self.cut(variant)])[0]


PENDING_BYTES = 256 * 2**20  # cut values held while waiting for others of their suffix


def agreement_importance(space: MergeSpace, gm: fx.GraphModule, batch: ExampleInputs, *,
                         keys: Iterable[Key] | None = None, progress: bool | None = None
                         ) -> ImportanceTable:
    """The cheap proxy table: for each key (by default every key of the space, as
    `estimate_importance`), exp(-relative squared error) of the output of the network with
    only that change against the original's on `batch`. `gm` is the graph `space` was
    analysed from. Each key computes its changed block; keys whose changes end at the same
    node share one stacked run of the rest of the network (`CachedOutputs`)."""
    require_space_of(space, gm, "agreement_importance")
    was_training = gm.training
    gm.eval()
    try:
        cache = CachedOutputs(gm, batch)
        jobs = probes(space, keys)
        group = max(1, SUFFIX_BATCH // int(cache.batch[0].shape[0]))
        errors: dict[Key, float] = {}
        pending: dict[int, list[tuple[Key, Cut]]] = {}
        held = 0  # bytes of the pending cuts' values

        def flush(index: int) -> None:
            nonlocal held
            waiting = pending.pop(index)
            held -= sum(_bytes(c) for _, c in waiting)
            outs = cache.outputs([c for _, c in waiting])
            for (key, _), out in zip(waiting, outs):
                errors[key] = relative_squared_error(out, cache.output)

        ordered = sorted(jobs, key=lambda k: jobs[k].end)  # keys ending together share a run
        for key in iterate(ordered, "importance (output agreement)", "key", progress):
            cut = cache.cut(prune_graph(gm, space, jobs[key].plan))
            pending.setdefault(cut.index, []).append((key, cut))
            held += _bytes(cut)
            if len(pending[cut.index]) >= group:
                flush(cut.index)
            if held > PENDING_BYTES:
                for index in list(pending):
                    flush(index)
        for index in list(pending):
            flush(index)
    finally:
        gm.train(was_training)
    values = {}
    for key in jobs:
        if not math.isfinite(errors[key]):
            raise TableError(f"importance entry {key}: the output's error is {errors[key]}")
        values[key] = math.exp(-errors[key])
    settings = ImportanceSettings(estimator="output agreement (no fine-tuning)",
                                  base_score=0.0, num_keys=len(values),
                                  single_convs_reinitialised=False,
                                  calibration_batch=int(cache.batch[0].shape[0]),
                                  calibration_shape=list(cache.batch[0].shape))
    return ImportanceTable(values, space.signature, settings, space.input_shapes)


def _bytes(cut: Cut) -> int:
    return sum(v.nbytes for v in cut.values.values() if isinstance(v, torch.Tensor))
