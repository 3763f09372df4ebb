"""Trace a model into a torch.fx GraphModule with a shape on every node."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _NamedShapeProp(ShapeProp):
    """ShapeProp that says which node failed."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:  # re-raised with the node named
            raise TraceError(
                f"shape propagation failed at node '{n.name}' ({n.op} {n.target}): {exc}"
            ) from exc


def propagate_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Record `tensor_meta` (shape, dtype, ...) on every node of `gm`, in place, in eval mode."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _NamedShapeProp(gm).propagate(*_as_tuple(example_inputs))
    finally:
        gm.train(was_training)
    gm.meta["fxmerge_input_shapes"] = [tuple(t.shape) for t in _as_tuple(example_inputs)]
    return gm


def trace(model: torch.nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace `model` (an nn.Module or GraphModule) and propagate `example_inputs` shapes.

    The model is copied first: the caller's module is never changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        gm = model
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
