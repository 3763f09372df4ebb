"""Trace a model into a torch.fx GraphModule with a shape on every node."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .canonical import canonicalize
from .errors import TraceError

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on real tensors and records each tensor's metadata on its node, like
    ShapeProp but never on fake tensors (inside a torch.compile backend ShapeProp would pick
    up dynamo's fake mode), and saying which node failed."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # re-raised with the node named
            raise TraceError(
                f"shape propagation failed at node '{n.name}' ({n.op} {n.target}): {exc}"
            ) from exc
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Record `tensor_meta` (shape, dtype, ...) on every node of `gm`, in place, in eval mode."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*_as_tuple(example_inputs))
    finally:
        gm.train(was_training)
    return gm


def random_inputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Random inputs with the shapes and dtypes recorded when the graph was traced."""
    return [torch.randn(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
            for n in gm.graph.nodes if n.op == "placeholder"]


def input_shapes(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """The shapes of the placeholders, as recorded by shape propagation."""
    return [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "placeholder"]


def ensure_shapes(gm: fx.GraphModule, shapes: Sequence[tuple[int, ...]]) -> fx.GraphModule:
    """Propagate shapes again when they were lost (a GraphModule sent to another process
    through pickle keeps its code but not its node metadata)."""
    if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        propagate_shapes(gm, [torch.randn(s) for s in shapes])
    return gm


def trace(model: torch.nn.Module | torch.export.ExportedProgram, example_inputs: ExampleInputs,
          ) -> fx.GraphModule:
    """Trace `model` and propagate `example_inputs` shapes onto every node.

    `model` is an nn.Module, a GraphModule (from symbolic_trace, a torch.compile backend or
    `ExportedProgram.module()`), or a `torch.export.ExportedProgram`; every form is mapped to
    the canonical one (see `fxmerge.canonical`). The caller's model is never changed.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        gm = canonicalize(model, _as_tuple(example_inputs))
    else:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {exc}. fxmerge needs a "
                "model without data-dependent control flow; wrap such parts in a leaf module "
                "or pass an already traced GraphModule."
            ) from exc
    return propagate_shapes(gm, example_inputs)
