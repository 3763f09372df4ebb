"""`fxmerge.trace`: a model (or export program, or graph) -> a canonical GraphModule with a
shape on every node, checked against the model on the example inputs."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_leaves

from ..errors import ArgumentError, TraceError
from . import families, registry  # noqa: F401  (importing `families` registers them)
from .canonical import canonicalize

log = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]
INPUTS_META = "fxmerge_example_inputs"


def as_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ArgumentError(f"example_inputs must be a tensor or a sequence of tensors, got "
                        f"{type(example_inputs).__name__}")
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


def propagate_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> Any:
    """Record `tensor_meta` on every node of `gm`, in place, running it in eval mode (its
    training flag is restored), then each node's op family (`registry.tag`: some families
    are known by their shapes), and keep the inputs for later passes; return the output."""
    inputs = as_tuple(example_inputs)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            output = _ShapeRecorder(gm).run(*inputs)
    finally:
        gm.train(was_training)
    gm.meta[INPUTS_META] = tuple(_concrete(t) for t in inputs)
    registry.tag(gm)
    return output


def _concrete(value: Any) -> Any:
    """An example input to keep: a detached tensor, or the value of a symbolic size."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, torch.SymInt):  # its example value, without adding a guard
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else value
    return value


def example_inputs(gm: fx.GraphModule) -> tuple:
    """The inputs `gm` was traced with; after pickling (which drops a GraphModule's
    metadata) use the inputs passed to `ensure_shapes` instead."""
    if INPUTS_META not in gm.meta:
        raise TraceError("this graph has no example inputs: trace it with fxmerge.trace")
    return gm.meta[INPUTS_META]


def input_specs(inputs: Sequence[torch.Tensor]) -> list[dict]:
    """Each input's shape and dtype, as plain data ({"shape": [...], "dtype": "float32"})."""
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for x in inputs]


def inputs_of(specs: Sequence[dict]) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes and dtypes `specs` name (`input_specs`): seeded normal floats,
    zeros of other dtypes."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        dtype = getattr(torch, s["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"input dtype {s['dtype']!r} is not a torch dtype")
        out.append(torch.randn(s["shape"], generator=gen, dtype=dtype) if dtype.is_floating_point
                   else torch.zeros(s["shape"], dtype=dtype))
    return tuple(out)


def ensure_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Propagate shapes again when they were lost (a GraphModule sent to another process
    through pickle keeps its code but not its node metadata)."""
    if INPUTS_META not in gm.meta or any(
            "tensor_meta" not in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        propagate_shapes(gm, inputs)
    return gm


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that also copies modules holding computed (non-leaf) tensors, such as
    the `weight` of an old-style `weight_norm` conv, which `copy.deepcopy` refuses."""
    memo = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise TraceError(f"could not copy {type(model).__name__} ({exc}); fxmerge works on a "
                         "copy so that it never changes the caller's model") from exc


def _tensors(output: Any) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):  # diffusers' output dataclasses
        output = output.to_tuple()
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def verify(reference: Callable, gm: fx.GraphModule, inputs: Sequence[Any], got: Any,
           what: str) -> None:
    """Raise `TraceError` unless the captured graph's output `got` equals `reference`'s on
    the same inputs (float rounding aside)."""
    try:
        with torch.no_grad():
            expected = reference(*inputs)
    except Exception as exc:
        raise TraceError(f"{what} failed on the example inputs: {exc}") from exc
    want, have = _tensors(expected), _tensors(got)
    if len(want) != len(have) or any(a.shape != b.shape for a, b in zip(want, have)):
        raise TraceError(f"the captured graph of {what} returns other outputs than the model "
                         f"({[tuple(a.shape) for a in want]} vs {[tuple(b.shape) for b in have]})")
    for a, b in zip(want, have):
        if not a.is_floating_point():
            same = torch.equal(a, b)
        else:
            scale = a.abs().max().item() if a.numel() else 0.0
            same = torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5 * max(1.0, scale))
        if not same:
            raise TraceError(
                f"the captured graph of {what} computes something else than the model on the "
                "example inputs (in-place updates of aliased tensors, hooks on traced-through "
                "modules, or a model exported in training mode do this); fxmerge refuses to "
                "work on a graph that is not the model")


def _check_no_global_hooks() -> None:
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        raise TraceError("global module forward hooks are registered: a merged network would "
                         "lose their effect; remove them before tracing")


CAPTURE_META = "fxmerge_capture"  # how the graph was captured (the path `trace` took)


def capture_by(model: torch.nn.Module, inputs: tuple, what: str, how: str) -> fx.GraphModule:
    """`model` captured by `how` ("symbolic_trace" or "torch.export"), canonical, with
    shapes, and checked against the model on `inputs`."""
    if how == "symbolic_trace":
        gm = fx.symbolic_trace(model)
        reference = copy_model(model)  # as tracing left it: baked-in Python state shows up
    else:
        # the model as it was, run once first (as exporting ran it), so that Python state
        # baked in at export shows up on the compared call; not a copy taken after
        # exporting, which ran forward on fake tensors (a detection head caches its anchors)
        reference = copy_model(model)
        try:
            with torch.no_grad():
                reference(*inputs)
        except Exception as exc:
            raise TraceError(f"{what} failed on the example inputs: {exc}") from exc
        # (the copy is a plain GraphModule: an exported program's module refuses .eval())
        gm = copy_model(torch.export.export(model, inputs, strict=False,
                                            dynamic_shapes=_any_size(model, inputs)).module())
    return _canonical(gm, reference, inputs, what, how)


def _any_size(model: torch.nn.Module, inputs: tuple) -> tuple:
    """torch.export's dynamic shapes for `inputs`: the batch and every spatial size left
    free where the model allows (`Dim.AUTO`; a size the model fixes stays fixed), so the
    captured graph runs at any batch and image size, as a symbolic trace does."""
    auto = torch.export.Dim.AUTO
    specs = tuple({d: auto for d in range(x.dim()) if d != 1 or x.dim() < 3}
                  if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    params = list(inspect.signature(model.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (specs,)  # forward(*inputs): one argument
    return specs


def _canonical(gm: fx.GraphModule, reference: Callable, inputs: tuple, what: str, how: str
               ) -> fx.GraphModule:
    """`gm` canonical, in eval mode, with shapes, checked against `reference` and marked
    with the capture path `how`."""
    gm = canonicalize(gm)
    for m in gm.modules():
        m.training = False
    got = propagate_shapes(gm, inputs)
    verify(reference, gm, inputs, got, what)
    gm.meta[CAPTURE_META] = how
    return gm


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def trace(model: torch.nn.Module | torch.export.ExportedProgram, example_inputs: ExampleInputs,
          ) -> fx.GraphModule:
    """Capture `model` as a canonical GraphModule in eval mode, with a shape on every node.

    `model` is an nn.Module, a GraphModule (from symbolic_trace or `ExportedProgram.module()`)
    or a `torch.export.ExportedProgram`; `example_inputs` a tensor or a tuple of them (integer
    ones too, such as a diffusion timestep). A module is captured with `fx.symbolic_trace`;
    where that fails or captures something else than the model (data-dependent control
    flow), with `torch.export` (non-strict). The captured graph is run next to the model on
    the example inputs and refused (`TraceError`, with each path's reason) unless both
    agree. `capture_path(gm)` says which path was taken. The caller's model is never changed.
    """
    _check_no_global_hooks()
    inputs = as_tuple(example_inputs)
    what = type(model).__name__
    given = None
    if isinstance(model, torch.export.ExportedProgram):
        model, given = model.module(), "torch.export (given)"
    elif isinstance(model, fx.GraphModule):
        given = "GraphModule (given)"
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module or an ExportedProgram, got {what}")
    model = copy_model(model)
    for m in model.modules():  # eval mode (an export program's module refuses .eval())
        m.training = False
    if given is not None:
        return _canonical(model, copy_model(model), inputs, what, given)
    reasons = []
    for how in ("symbolic_trace", "torch.export"):
        try:  # each path from the model as given (capturing may change its Python state)
            gm = capture_by(copy_model(model), inputs, what, how)
        except Exception as exc:  # noqa: BLE001 (each path's failure is reported)
            reasons.append(f"{how}: {_one_line(exc)}")
            log.info("capture of %s by %s failed: %s", what, how, exc)
            continue
        if reasons:
            log.info("%s captured by %s (%s)", what, how, reasons[0])
        return gm
    raise TraceError(f"fxmerge could not capture {what}: " + "; ".join(reasons)
                     + ". fxmerge needs a graph that computes what the model computes: wrap "
                     "data-dependent parts in a leaf module")


def capture_path(gm: fx.GraphModule) -> str:
    """How `trace` captured `gm`: "symbolic_trace", "torch.export", or a given graph."""
    return gm.meta.get(CAPTURE_META, "unknown")
