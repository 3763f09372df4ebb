"""Capture: every graph form becomes one canonical, verified GraphModule.

`trace` takes an nn.Module (via `symbolic_trace`), a GraphModule, or a `torch.export`
program; the torch.compile backend hands its dynamo graphs to `canonicalize` too. Everything
downstream (`space`, `passes`) sees only canonical graphs: their invariants are written, and
checked, in `invariants` (`check_canonical`).
"""

from .invariants import check_canonical
from .trace import ExampleInputs, ensure_shapes, example_inputs, propagate_shapes, trace, verify

__all__ = ["ExampleInputs", "check_canonical", "ensure_shapes", "example_inputs",
           "propagate_shapes", "trace",
           "verify"]
