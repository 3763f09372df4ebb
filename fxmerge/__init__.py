"""fxmerge: LayerMerge depth compression for CNNs as a torch.fx graph-transform pass."""

import logging

from .backends import backend
from .capture import check_canonical, trace
from .compress import CompressResult, compress
from .deploy import export_onnx, load, save
from .errors import (
    ArgumentError,
    FxMergeError,
    InfeasibleBudget,
    MergeError,
    PlanError,
    SpaceError,
    TableError,
    TraceError,
)
from .passes import (
    GraphDiff,
    MergePass,
    PrunePass,
    ReparameterizePass,
    diff,
    merge,
    prune,
    reparameterize,
    transform,
)
from .plan import Block, Plan
from .solve import METHODS, Frontier, Method, frontier, get_method, solve
from .solve.measured import NetworkTimer, solve_measured
from .space import Conv, DepthKey, Entry, KernelOption, MergeSpace, Skip, analyze
from .tables.agreement import agreement_importance
from .tables.importance import ImportanceTable, estimate_importance
from .tables.latency import LatencyTable, measure_latency

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "METHODS",
    "ArgumentError",
    "Block",
    "CompressResult",
    "Conv",
    "DepthKey",
    "Entry",
    "Frontier",
    "FxMergeError",
    "GraphDiff",
    "ImportanceTable",
    "InfeasibleBudget",
    "KernelOption",
    "LatencyTable",
    "MergeError",
    "MergePass",
    "MergeSpace",
    "Method",
    "NetworkTimer",
    "Plan",
    "PlanError",
    "PrunePass",
    "ReparameterizePass",
    "Skip",
    "SpaceError",
    "TableError",
    "TraceError",
    "agreement_importance",
    "analyze",
    "backend",
    "check_canonical",
    "compress",
    "diff",
    "estimate_importance",
    "export_onnx",
    "frontier",
    "get_method",
    "load",
    "measure_latency",
    "merge",
    "prune",
    "reparameterize",
    "save",
    "solve",
    "solve_measured",
    "trace",
    "transform",
]
