"""Capture: every graph form becomes one canonical, verified GraphModule.

`trace` takes an nn.Module (via `symbolic_trace`), a GraphModule, or a `torch.export`
program; the torch.compile backend hands its dynamo graphs to `canonicalize` too. Everything
downstream (`space`, `passes`) sees only canonical graphs, whose invariants are:

- it computes what the model computes in eval mode, on the example inputs (checked: `trace`
  runs both and raises `TraceError` when they differ);
- it is in eval mode; weights and BatchNorm statistics are module parameters and buffers,
  and forward inputs stay placeholders (a conv whose weight is an input is a barrier);
- its ops come from the vocabulary in `ops`: `nn.Conv2d`, foldable `nn.BatchNorm2d`,
  activation modules, `operator.add` of equal shapes, `F.pad`; identities (`nn.Identity`,
  dropout and drop path in eval mode, `x / 1`) are gone. Anything else is a barrier;
- a searched conv has one call site and no hooks (others stay out of the search, with the
  reason in `MergeSpace.summary()`).
"""

from .trace import ExampleInputs, ensure_shapes, example_inputs, propagate_shapes, trace, verify

__all__ = ["ExampleInputs", "ensure_shapes", "example_inputs", "propagate_shapes", "trace",
           "verify"]
