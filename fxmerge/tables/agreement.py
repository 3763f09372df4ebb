"""The output-agreement importance proxy: how far each candidate moves the network's output.

No fine-tuning and no labels. `OutputAgreement` scores any network against the original on a
calibration batch (an `evaluate` for `estimate_importance`). `agreement_importance` builds
the whole table that way but far faster: each key's network is `prune_graph`'s (it shares
the original's unchanged modules), and it runs with the original's value already in place
at every node the plan leaves unchanged, so only the changed block and what follows it are
computed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from ..capture.trace import ExampleInputs, as_tuple
from ..errors import TableError
from ..passes.prune import PrunedGraph, prune_graph
from ..progress import progress as iterate
from ..space import MergeSpace, require_space_of
from .base import Key
from .importance import ImportanceSettings, ImportanceTable, importance_jobs


def relative_squared_error(out: Any, reference: Any) -> float:
    """Squared error of `out` relative to the squared size of `reference`, over every
    tensor they hold (a segmentation net's dict of outputs, a detector's tuple)."""
    pairs = list(zip(tree_leaves(out), tree_leaves(reference)))
    error = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    size = sum(float(b.pow(2).sum()) for _, b in pairs)
    return error / max(size, 1e-12)


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


def _same_constants(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (tensors and other values without a plain ==)
        return a is b


class _Run(fx.Interpreter):
    """Runs a `PrunedGraph`: its own modules where it has them, the original's elsewhere."""

    def __init__(self, variant: PrunedGraph) -> None:
        super().__init__(variant.base, graph=variant.graph)
        self.replaced = variant.modules

    def fetch_attr(self, target: str) -> Any:
        return self.replaced[target] if target in self.replaced else super().fetch_attr(target)


class CachedOutputs:
    """The original graph's value at every node on one batch, and the output of graphs
    edited from it (same node names) computing only the nodes whose value can differ.

    A node keeps the original's value when it has the same op, target and constant
    arguments as the original node of its name, all its inputs keep theirs, and its module
    was not replaced. Memory: one forward's activations."""

    def __init__(self, gm: fx.GraphModule, batch: ExampleInputs) -> None:
        self.batch = as_tuple(batch)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        recorder = fx.Interpreter(gm, garbage_collect_values=False)  # keeps every value
        with torch.no_grad():
            self.output = recorder.run(*self.batch)
        self.values = {n.name: v for n, v in recorder.env.items()}

    def unchanged(self, variant: PrunedGraph) -> dict[fx.Node, Any]:
        """The nodes of `variant` whose value is the original's, with that value."""
        env: dict[fx.Node, Any] = {}
        for node in variant.graph.nodes:
            original = self.nodes.get(node.name)
            if (original is None or node.op == "output" or node.op != original.op
                    or node.target != original.target
                    or any(n not in env for n in node.all_input_nodes)):
                continue
            names = fx.node.map_arg((node.args, node.kwargs), lambda n: n.name)
            if not _same_constants(names, fx.node.map_arg((original.args, original.kwargs),
                                                         lambda n: n.name)):
                continue
            if node.target in variant.modules:
                continue
            env[node] = self.values[node.name]
        return env

    def run(self, variant: PrunedGraph) -> Any:
        """`variant`'s output on the batch (in the original's mode: eval for importance)."""
        with torch.no_grad():
            return _Run(variant).run(*self.batch, initial_env=self.unchanged(variant))


def agreement_importance(space: MergeSpace, gm: fx.GraphModule, batch: ExampleInputs, *,
                         keys: Iterable[Key] | None = None, progress: bool | None = None
                         ) -> ImportanceTable:
    """The cheap proxy table: for each key (by default every key of the space, as
    `estimate_importance`), exp(-relative squared error) of the output of the network with
    only that change against the original's on `batch`. `gm` is the graph `space` was
    analysed from. About one partial forward of `batch` per key."""
    require_space_of(space, gm, "agreement_importance")
    was_training = gm.training
    gm.eval()
    try:
        cache = CachedOutputs(gm, batch)
        values = {}
        jobs = importance_jobs(space, keys, reset_single=False)
        for key, (plan, _) in iterate(jobs.items(), "importance (output agreement)", "key",
                                      progress):
            err = relative_squared_error(cache.run(prune_graph(gm, space, plan)), cache.output)
            if not math.isfinite(err):
                raise TableError(f"importance entry {key}: the output's error is {err}")
            values[key] = math.exp(-err)
    finally:
        gm.train(was_training)
    settings = ImportanceSettings(estimator="output agreement (no fine-tuning)",
                                  base_score=0.0, num_keys=len(values),
                                  single_convs_reinitialised=False,
                                  calibration_batch=int(cache.batch[0].shape[0]))
    return ImportanceTable(values, space.signature, settings, space.input_shapes)
