"""Graph rewrites as torch.fx passes with contracts (`PrunePass`, `MergePass`,
`ReparameterizePass`: requires / call / ensures; they run in a `PassManager`), and the
functional API over them (`prune`, `merge`, `transform`, `reparameterize`). No pass changes
the graph it is given."""

from .base import FxMergePass
from .diff import GraphDiff, diff
from .merge import MergePass, merge, transform
from .prune import PrunePass, prune
from .reparameterize import ReparameterizePass, reparameterize

__all__ = ["FxMergePass", "GraphDiff", "MergePass", "PrunePass", "ReparameterizePass", "diff",
           "merge", "prune", "reparameterize", "transform"]
