"""Read a part of a canonical graph as one affine map of a value: convs composed,
BatchNorms and per-channel scales folded, adds summed, pads and crops absorbed
(`fxmerge.algebra` does the maths). The merge pass reads each block this way, the
re-parameterisation pass each region of parallel branches."""

from __future__ import annotations

import torch
from torch import fx

from .. import algebra
from ..errors import MergeError
from . import ops


class AffineReader:
    """Computes the affine map from one node of a graph (`source`) to later nodes."""

    def __init__(self, gm: fx.GraphModule, source: fx.Node, channels: int,
                 exclude: tuple[str, ...] = (), max_bytes: int | None = None) -> None:
        self.gm = gm
        self.source = source
        self.exclude = exclude
        self.max_bytes = max_bytes
        self.affine: dict[fx.Node, algebra.AffineConv | None] = {
            source: algebra.identity(channels, torch.float64)}

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

    def _refuse(self, node: fx.Node, strict: bool, why: str):
        if strict:
            raise MergeError(f"cannot merge through node '{node.name}' ({node.op} "
                             f"{node.target}): {why}")

    @staticmethod
    def _conv_input(node: fx.Node, module) -> tuple[fx.Node | None, tuple[int, int] | None]:
        """What a conv node reads and its padding (rows, columns): a crop of rows or columns
        alone before it (prune's, before a 1xk branch of a region) is part of its padding."""
        if not isinstance(module, torch.nn.Conv2d) or not node.args:
            return None, None
        x, padding = node.args[0], tuple(module.padding)
        crop = ops.pad_amounts(x) if isinstance(x, fx.Node) else None
        if crop is not None and crop[0] != crop[1] and len(x.users) == 1:
            return x.args[0], (padding[0] + crop[0], padding[1] + crop[1])
        return x, padding

    def _step(self, node: fx.Node, strict: bool) -> algebra.AffineConv | None:
        if node.op == "placeholder" or not node.all_input_nodes:
            return self._refuse(node, strict, "not computed from the block's input")
        module = ops.module_of(self.gm, node)
        x, padding = self._conv_input(node, module)
        if ops.is_conv(self.gm, node) and ops.centred_refusal(module, padding) is None:
            if ops.excluded(node.target, self.exclude):
                return self._refuse(node, strict, "the conv is excluded from merging")
            inner = self.read(x, strict=strict)
            if inner is not None and x is not node.args[0]:
                self.affine[node.args[0]] = None  # the crop: read, as part of the conv
            return inner and algebra.compose(inner, algebra.from_conv(module, padding=padding),
                                             self.max_bytes)
        if ops.is_norm(self.gm, node):  # folded as in eval mode (the passes require it)
            inner = self.read(node.args[0], strict=strict)
            return inner and algebra.fold_bn(inner, module)
        scaled = ops.channel_scale(self.gm, node)
        if scaled is not None:
            inner = self.read(scaled[0], strict=strict)
            scale = scaled[1].to(torch.float64)
            return inner and algebra.scale_shift(inner, scale, torch.zeros_like(scale))
        amount = ops.pad_amount(node)
        if amount is not None:
            inner = self.read(node.args[0], strict=strict)
            return inner and algebra.crop_output(inner, -amount)
        if ops.is_add(node):
            parts = [self.read(a, strict=strict) for a in node.args]
            return None if None in parts else algebra.add(*parts, self.max_bytes)
        pair = ops.conditioning_add(node)
        if pair is not None:
            main, condition = pair
            if self.source in ops.ancestors(condition) or condition is self.source:
                return self._refuse(node, strict, "the added vector depends on the block input")
            inner = self.read(main, strict=strict)
            return inner and algebra.add_condition(inner, condition.name)
        return self._refuse(node, strict, "unknown or non-linear op inside a block")
