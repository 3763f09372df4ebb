"""The per-channel linear families: skip adds, a vector per sample added to a map,
zero padding and crops, constant per-channel scales."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ... import algebra
from .. import ops
from ..affine import AffineReader
from ..canonical import Canonicaliser
from ..registry import NodeKind, OpFamily, functions, register


def _canonical_add(cz: Canonicaliser, node: fx.Node) -> bool:
    """`a + b` in any form becomes `operator.add` where that is what it computes."""
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return False
    if node.target in ops.IN_PLACE_ADD and len(node.args[0].users) > 1:
        return False  # the in-place result is seen through another alias: keep it as it is
    node.target, node.kwargs = operator.add, {}
    return True


def _read_add(reader: AffineReader, node: fx.Node, strict: bool):
    parts = [reader.read(a, strict=strict) for a in node.args]
    return None if None in parts else algebra.add(*parts, reader.max_bytes)


register(OpFamily("add", NodeKind.ADD, lambda gm, n: ops.is_add(n),
                  functions(ops.ADD_FUNCTIONS, _canonical_add), _read_add))


# ---- a vector per sample added to a map (DDPM's timestep embedding) -----------------------
def _read_condition(reader: AffineReader, node: fx.Node, strict: bool):
    main, condition = ops.conditioning_add(node)
    if reader.source in ops.ancestors(condition) or condition is reader.source:
        return reader.refuse(node, strict, "the added vector depends on the block input")
    inner = reader.read(main, strict=strict)
    return inner and algebra.add_condition(inner, condition.name)


register(OpFamily("condition", NodeKind.CONDITION,
                  lambda gm, n: ops.conditioning_add(n) is not None, read=_read_condition))


# ---- zero padding and crops ---------------------------------------------------------------
def _read_pad(reader: AffineReader, node: fx.Node, strict: bool):
    inner = reader.read(node.args[0], strict=strict)
    return inner and algebra.crop_output(inner, [-n for n in ops.pad_amounts(node)])


register(OpFamily("pad", NodeKind.PAD, lambda gm, n: ops.pad_amounts(n) is not None,
                  read=_read_pad))


# ---- a constant scale per channel ---------------------------------------------------------
def _read_scale(reader: AffineReader, node: fx.Node, strict: bool):
    x, scale = ops.channel_scale(reader.gm, node)
    inner = reader.read(x, strict=strict)
    scale = scale.to(torch.float64)
    return inner and algebra.scale_shift(inner, scale, torch.zeros_like(scale))


register(OpFamily("scale", NodeKind.SCALE,
                  lambda gm, n: ops.channel_scale(gm, n) is not None, read=_read_scale,
                  label="per-channel scales"))
