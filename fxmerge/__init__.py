"""fxmerge: LayerMerge depth compression for CNNs as a torch.fx graph-transform pass."""

import logging

from .backends import backend
from .backends.timing import (
    steady_memory,
    time_against_reference,
    time_interleaved,
    using_threads,
)
from .capture import check_canonical, trace
from .compress import CompressResult, compress
from .deploy import export_onnx, load, save
from .errors import (
    ArgumentError,
    BackendError,
    FxMergeError,
    InfeasibleBudget,
    MergeError,
    PlanError,
    SpaceError,
    TableError,
    TraceError,
)
from .job import BudgetBasis, Job
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
from .solve import METHODS, Frontier, Method, fastest_latency, frontier, get_method, solve
from .solve.depth import DepthKey, depth_keys
from .solve.measured import NetworkTimer, solve_measured
from .space import Conv, Entry, KernelOption, MergeSpace, Skip, StrideRule, analyze
from .tables.agreement import OutputAgreement, agreement_importance
from .tables.importance import ImportanceTable, estimate_importance, importance_keys, score_plan
from .tables.latency import LatencyTable, entry_layer, measure_latency

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "METHODS",
    "ArgumentError",
    "BackendError",
    "Block",
    "BudgetBasis",
    "CompressResult",
    "Conv",
    "DepthKey",
    "Entry",
    "Frontier",
    "FxMergeError",
    "GraphDiff",
    "ImportanceTable",
    "InfeasibleBudget",
    "Job",
    "KernelOption",
    "LatencyTable",
    "MergeError",
    "MergePass",
    "MergeSpace",
    "Method",
    "NetworkTimer",
    "OutputAgreement",
    "Plan",
    "PlanError",
    "PrunePass",
    "ReparameterizePass",
    "Skip",
    "SpaceError",
    "StrideRule",
    "TableError",
    "TraceError",
    "agreement_importance",
    "analyze",
    "backend",
    "check_canonical",
    "compress",
    "depth_keys",
    "diff",
    "entry_layer",
    "estimate_importance",
    "export_onnx",
    "fastest_latency",
    "frontier",
    "get_method",
    "importance_keys",
    "load",
    "measure_latency",
    "merge",
    "prune",
    "reparameterize",
    "save",
    "score_plan",
    "solve",
    "solve_measured",
    "steady_memory",
    "time_against_reference",
    "time_interleaved",
    "trace",
    "transform",
    "using_threads",
]
