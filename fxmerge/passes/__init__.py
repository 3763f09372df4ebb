"""Graph rewrites: each a function (gm, ...) -> new gm that never mutates its input."""

from .diff import GraphDiff, diff
from .merge import merge, transform
from .prune import prune

__all__ = ["GraphDiff", "diff", "merge", "prune", "transform"]
