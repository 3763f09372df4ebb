"""`fxmerge.backend(plan)`: a torch.compile backend that applies a plan, then hands the
merged graph to inductor, TensorRT or eager.

    torch.compile(model, backend=fxmerge.backend(plan))
    torch.compile(model, backend="fxmerge", options={"plan": plan, "then": "eager"})
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ..capture import ops, propagate_shapes, verify
from ..capture.canonical import canonicalize
from ..capture.families.conv import CONV_FUNCTIONS
from ..capture.families.norm import refuse_training
from ..errors import ArgumentError, BackendError, FxMergeError, PlanError, SpaceError
from ..passes import transform
from ..plan import Plan
from ..space import analyze
from .runtimes import Backend, get_backend

log = logging.getLogger(__name__)

THEN = (Backend.INDUCTOR, Backend.EAGER, Backend.TENSORRT)  # what may compile the result




def hand_over(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              then: str | Backend) -> Callable:
    """Compile the merged graph with the next backend."""
    then = get_backend(then, THEN)
    if then is Backend.EAGER:
        return gm
    if then is Backend.INDUCTOR:
        return _LazyInductor(gm)
    try:
        import torch_tensorrt  # noqa: F401  (optional)
    except ImportError as exc:
        raise BackendError("the tensorrt backend needs torch-tensorrt: "
                           "pip install 'fxmerge[trt]'") from exc
    return torch.compile(gm, backend="tensorrt")


class _LazyInductor:
    """Compiles the merged graph with inductor on its first call: outside dynamo's tracing
    context, where the merged weights (new constants) are plain module parameters."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.compiled: Callable | None = None

    def __call__(self, *args):
        if self.compiled is None:
            from torch._inductor.compile_fx import compile_fx

            self.compiled = compile_fx(self.gm, list(args))
        return self.compiled(*args)


def backend(plan: Plan, *, then: str = "inductor") -> Callable:
    """A torch.compile backend: canonicalise the captured graph (weights become constants,
    so the merged weights are computed once), apply `plan` (BN folded, blocks merged), and
    compile the result with `then`. For inference: the model's weights are read at compile
    time."""
    then = get_backend(then, THEN)

    def compile_fn(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        try:
            merged = apply_plan(gm, example_inputs, plan)
        except FxMergeError as exc:  # raised to the caller as itself, not wrapped by dynamo
            log.error("fxmerge backend: %s", exc)
            return _Refusal(exc)
        return hand_over(merged, example_inputs, then)

    return compile_fn


def apply_plan(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: Plan
               ) -> fx.GraphModule:
    """Canonicalise one graph dynamo captured (checked against it on the example inputs) and
    apply the part of `plan` whose convs it holds (a graph break splits a model into several
    graphs); a graph with no searched conv is returned canonical and unchanged."""
    refuse_training(gm)
    canonical = canonicalize(copy.deepcopy(gm), example_inputs)
    got = propagate_shapes(canonical, example_inputs)
    verify(gm, canonical, example_inputs, got, "the graph torch.compile captured")
    exclude = [p for p in plan.exclude if any(
        fnmatch.fnmatchcase(name, p) for name, m in canonical.named_modules()
        if isinstance(m, ops.CONVS))]
    try:
        space = analyze(canonical, stride_rule=plan.stride_rule, exclude=exclude,
                        add_activations=plan.add_activations,
                        max_kernel_bytes=plan.max_kernel_bytes)
    except SpaceError:
        if any(n.op == "call_module" and isinstance(canonical.get_submodule(n.target),
                                                    ops.CONVS)
               or n.target in CONV_FUNCTIONS for n in canonical.graph.nodes):
            raise PlanError("torch.compile captured convolutions that fxmerge could not "
                            "recognise as the model's own, so the plan cannot apply") from None
        return canonical  # a graph without convs: nothing of the plan's is here
    part = plan.restrict(space)
    log.info("fxmerge backend: %d of the plan's %d blocks in this graph", len(part.blocks),
             len(plan.blocks))
    return transform(canonical, part, space)


class _Refusal:
    """Stands for a graph fxmerge refused: calling it raises the fxmerge error."""

    def __init__(self, error: FxMergeError) -> None:
        self.error = error

    def __call__(self, *args: Any) -> Any:
        raise type(self.error)(str(self.error)) from self.error


def registered_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                       options: dict[str, Any] | None = None) -> Callable:
    """The backend named "fxmerge": `options={"plan": plan, "then": "inductor"}`."""
    options = dict(options or {})
    try:
        plan = options.pop("plan", None)
        if plan is None:
            raise ArgumentError('torch.compile(backend="fxmerge") needs options={"plan": plan}')
        if isinstance(plan, str):
            plan = Plan.from_json(plan)
        if not isinstance(plan, Plan):
            raise ArgumentError(f"options['plan'] must be a Plan or its JSON, got "
                                f"{type(plan).__name__}")
        unknown = set(options) - {"then"}
        if unknown:
            raise ArgumentError(f"unknown fxmerge backend option(s) {sorted(unknown)} (it "
                                "takes 'plan' and 'then')")
        compile_fn = backend(plan, **options)
    except FxMergeError as exc:  # raised to the caller as itself, not wrapped by dynamo
        log.error("fxmerge backend: %s", exc)
        return _Refusal(exc)
    return compile_fn(gm, example_inputs)


def register() -> None:
    """Register the "fxmerge" name with torch.compile by hand (an installed fxmerge is
    found through its `torch_dynamo_backends` entry point without this)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fxmerge" not in _BACKENDS:
        register_backend(name="fxmerge")(registered_backend)
