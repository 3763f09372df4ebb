"""Graph rewrites as torch.fx passes with contracts (`PrunePass`, `MergePass`: requires /
call / ensures; they run in a `PassManager`), and the functional API over them (`prune`,
`merge`, `transform`). No pass changes the graph it is given."""

from .base import FxMergePass
from .diff import GraphDiff, diff
from .merge import MergePass, merge, transform
from .prune import PrunePass, prune

__all__ = ["FxMergePass", "GraphDiff", "MergePass", "PrunePass", "diff", "merge", "prune",
           "transform"]
