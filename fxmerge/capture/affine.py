"""Read a part of a canonical graph as one affine map of a value: each node by its op
family's reading (`registry.OpFamily.read`: convs composed, BatchNorms and per-channel
scales folded, adds summed, pads and crops absorbed; `fxmerge.algebra` does the maths).
The merge pass reads each block this way, the re-parameterisation pass each region of
parallel branches."""

from __future__ import annotations

import torch
from torch import fx

from .. import algebra
from ..errors import MergeError
from . import registry


class AffineReader:
    """Computes the affine map from one node of a graph (`source`) to later nodes."""

    def __init__(self, gm: fx.GraphModule, source: fx.Node, channels: int,
                 exclude: tuple[str, ...] = (), max_bytes: int | None = None,
                 rank: int = 2) -> None:
        self.gm = gm
        self.source = source
        self.exclude = exclude
        self.max_bytes = max_bytes
        self.affine: dict[fx.Node, algebra.AffineConv | None] = {
            source: algebra.identity(channels, torch.float64, rank)}

    def read(self, node: fx.Node, *, strict: bool) -> algebra.AffineConv | None:
        """The affine map of `node`, or None (strict: MergeError) if it is not one."""
        if node in self.affine:
            return self.affine[node]
        result = self._step(node, strict)
        if result is not None:
            self.affine[node] = result
            for a in node.all_input_nodes:  # a value read once is spent: free its kernel
                if a in self.affine and a is not self.source and len(a.users) == 1:
                    self.affine[a] = None  # (it stays in the region read)
        return result

    @property
    def region(self) -> list[fx.Node]:
        """Every node read, the source aside, in the order read."""
        return [n for n in self.affine if n is not self.source]

    def refuse(self, node: fx.Node, strict: bool, why: str) -> None:
        """None, or (strict) a `MergeError` naming `node` and `why`."""
        if strict:
            raise MergeError(f"cannot merge through node '{node.name}' ({node.op} "
                             f"{node.target}): {why}")

    def _step(self, node: fx.Node, strict: bool) -> algebra.AffineConv | None:
        if node.op == "placeholder" or not node.all_input_nodes:
            return self.refuse(node, strict, "not computed from the block's input")
        family = registry.family_of(self.gm, node)
        if family is None or family.read is None:
            return self.refuse(node, strict, "unknown or non-linear op inside a block")
        return family.read(self, node, strict)
