"""`fxmerge.backend(plan)`: a torch.compile backend that applies a plan, then hands the
merged graph to inductor, TensorRT or eager.

    torch.compile(model, backend=fxmerge.backend(plan))
    torch.compile(model, backend="fxmerge", options={"plan": plan, "then": "eager"})
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ..capture.canonical import canonicalize
from ..capture.trace import propagate_shapes
from ..errors import FxMergeError
from ..passes import transform
from ..plan import Plan

log = logging.getLogger(__name__)

THEN = ("inductor", "eager", "tensorrt")


def hand_over(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], then: str
              ) -> Callable:
    """Compile the merged graph with the next backend."""
    if then == "eager":
        return gm
    if then == "inductor":
        return _LazyInductor(gm)
    if then == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401  (optional)
        except ImportError as exc:
            raise FxMergeError("then='tensorrt' needs torch-tensorrt: "
                               "pip install 'fxmerge[trt]'") from exc
        return torch.compile(gm, backend="tensorrt")
    raise ValueError(f"then must be one of {THEN}, got {then!r}")


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


def backend(plan: Plan, *, then: str = "inductor", add_activations: bool = False) -> Callable:
    """A torch.compile backend: canonicalise the captured graph (weights become constants,
    so the merged weights are computed once), apply `plan` (BN folded, blocks merged), and
    compile the result with `then`. For inference: the model's weights are read at compile
    time."""
    if then not in THEN:
        raise ValueError(f"then must be one of {THEN}, got {then!r}")

    def compile_fn(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        canonical = canonicalize(gm, example_inputs)
        propagate_shapes(canonical, example_inputs)
        merged = transform(canonical, plan, add_activations=add_activations)
        log.info("fxmerge backend: %d blocks merged, handing over to %s", len(plan.blocks),
                 then)
        return hand_over(merged, example_inputs, then)

    return compile_fn


def registered_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                       options: dict[str, Any] | None = None) -> Callable:
    """The backend named "fxmerge": `options={"plan": plan, "then": "inductor"}`."""
    options = dict(options or {})
    plan = options.pop("plan", None)
    if plan is None:
        raise FxMergeError('torch.compile(backend="fxmerge") needs options={"plan": plan}')
    if isinstance(plan, str):
        plan = Plan.from_json(plan)
    return backend(plan, **options)(gm, example_inputs)


def register() -> None:
    """Register the "fxmerge" name with torch.compile by hand (an installed fxmerge is
    found through its `torch_dynamo_backends` entry point without this)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fxmerge" not in _BACKENDS:
        register_backend(name="fxmerge")(registered_backend)
