"""fxmerge: LayerMerge depth compression for CNNs as a torch.fx graph-transform pass."""

import logging

from .errors import (
    FxMergeError,
    InfeasibleBudget,
    MergeError,
    PlanError,
    SpaceError,
    TableError,
    TraceError,
)
from .space import Conv, Entry, KernelOption, MergeSpace, Skip, analyze
from .trace import trace

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Conv", "Entry", "FxMergeError", "InfeasibleBudget", "KernelOption", "MergeError",
    "MergeSpace", "PlanError", "Skip", "SpaceError", "TableError", "TraceError",
    "analyze", "trace",
]
