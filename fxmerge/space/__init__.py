"""The merge space: what LayerMerge may change in one traced graph, as frozen plain data.

`records` (convs, skips, units, graph nodes, entries), `kernels` (what a block's kept convs
merge into: the named search state and the enumeration of legal blocks), `space`
(`MergeSpace`), `analysis` (`analyze`, from a canonical graph), `report` (`summary`,
`reach`).
"""

from .analysis import analyze, left_out_convs
from .kernels import Chosen, MergeState, best_subsets, choose_convs, kernel_of, merge_peak_bytes
from .records import (
    IDENTITY,
    MAX_KERNEL_BYTES,
    Conv,
    DepthKey,
    Entry,
    GraphNode,
    KernelOption,
    MergedConv,
    Skip,
    StrideRule,
    Unit,
)
from .report import reach, summary
from .space import MergeSpace, require_space_of

__all__ = ["IDENTITY", "MAX_KERNEL_BYTES", "Chosen", "Conv", "DepthKey", "Entry", "GraphNode",
           "KernelOption", "MergeSpace", "MergeState", "MergedConv", "Skip", "StrideRule", "Unit",
           "analyze", "best_subsets", "choose_convs", "kernel_of", "left_out_convs",
           "merge_peak_bytes", "reach", "require_space_of", "summary"]
