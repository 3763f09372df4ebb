"""fxmerge: LayerMerge depth compression for CNNs as a torch.fx graph-transform pass."""

import logging

from .backends import backend
from .backends.timing import (
    Allocator,
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
from .estimate import (
    NetworkTimer,
    OutputAgreement,
    agreement_importance,
    entry_layer,
    estimate_importance,
    measure_latency,
    score_plan,
    solve_measured,
)
from .inside import apply, merge
from .job import BudgetBasis, Job
from .passes import (
    GraphDiff,
    MergePass,
    PrunePass,
    ReparameterizePass,
    diff,
    prune,
    reparameterize,
    transform,
)
from .plan import Block, Plan
from .recipes import agreement, distill
from .solve import (
    METHODS,
    Frontier,
    Method,
    MethodName,
    Probe,
    fastest_latency,
    frontier,
    get_method,
    importance_keys,
    probes,
    solve,
)
from .solve.depth import depth_keys
from .space import Conv, DepthKey, Entry, KernelOption, MergeSpace, Skip, StrideRule, analyze
from .tables import ImportanceTable, KeyKind, LatencyTable, register_key_kind

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "METHODS",
    "Allocator",
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
    "KeyKind",
    "LatencyTable",
    "MergeError",
    "MergePass",
    "MergeSpace",
    "Method",
    "MethodName",
    "NetworkTimer",
    "OutputAgreement",
    "Plan",
    "PlanError",
    "Probe",
    "PrunePass",
    "ReparameterizePass",
    "Skip",
    "SpaceError",
    "StrideRule",
    "TableError",
    "TraceError",
    "agreement",
    "agreement_importance",
    "analyze",
    "apply",
    "backend",
    "check_canonical",
    "compress",
    "depth_keys",
    "diff",
    "distill",
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
    "probes",
    "prune",
    "register_key_kind",
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
