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
from .passes import GraphDiff, diff, merge, prune, transform
from .plan import Block, Plan
from .space import Conv, Entry, KernelOption, MergeSpace, Skip, analyze
from .trace import trace

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Block",
    "Conv",
    "Entry",
    "FxMergeError",
    "GraphDiff",
    "InfeasibleBudget",
    "KernelOption",
    "MergeError",
    "MergeSpace",
    "Plan",
    "PlanError",
    "Skip",
    "SpaceError",
    "TableError",
    "TraceError",
    "analyze",
    "diff",
    "merge",
    "prune",
    "trace",
    "transform",
]
