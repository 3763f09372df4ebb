"""Capture: every graph form becomes one canonical, verified GraphModule.

`trace` takes an nn.Module (via `symbolic_trace`, else `torch.export`), a GraphModule, or
a `torch.export` program; the torch.compile backend hands its dynamo graphs to `canonicalize` too. Everything
downstream (`space`, `passes`) sees only canonical graphs: their invariants are written, and
checked, in `invariants` (`check_canonical`).
"""

from .invariants import check_canonical, require_graph_module
from .trace import (
    ExampleInputs,
    capture_path,
    ensure_shapes,
    example_inputs,
    input_specs,
    inputs_of,
    propagate_shapes,
    trace,
    verify,
)

__all__ = ["ExampleInputs", "capture_path", "check_canonical", "ensure_shapes",
           "example_inputs", "input_specs", "inputs_of", "propagate_shapes", "require_graph_module", "trace", "verify"]
