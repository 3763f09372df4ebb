"""The conv family: `nn.Conv1d/2d/3d` calls, what functional convs of constant weights
become, composed onto what they read."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.utils import parametrize

from ... import algebra
from .. import ops
from ..affine import AffineReader
from ..canonical import Canonicaliser, NotConstant
from ..registry import NodeKind, OpFamily, functions, module_is, register

aten = torch.ops.aten


CONV_FUNCTIONS = (torch.conv1d, F.conv1d, aten.conv1d.default, aten.conv1d.padding,
                  torch.conv2d, F.conv2d, aten.conv2d.default, aten.conv2d.padding,
                  torch.conv3d, F.conv3d, aten.conv3d.default, aten.conv3d.padding,
                  aten.convolution.default)


def _canonical_conv(cz: Canonicaliser, node: fx.Node) -> bool:
    """A functional conv of constant weights becomes an `nn.Conv1d/2d/3d` call."""
    if node.target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args
        if transposed:
            return False
    else:
        x, w, b, stride, padding, dilation, groups = cz.arguments(
            node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
            [None, None, None, 1, 0, 1, 1])
    try:
        weight, bias = cz.constant(w), cz.constant(b)
    except NotConstant:
        return False
    rank = weight.dim() - 2
    if rank not in algebra.CONV_MODULES:
        return False
    sides = lambda v: tuple(v) if isinstance(v, Sequence) else (v,) * rank
    stride, dilation = sides(stride), sides(dilation)
    padding = ops.static_padding(padding, weight.shape[2:], stride, dilation)
    if padding is None:
        return False
    name, shared = cz.name_for(node, w, weight, "conv")
    conv = None
    if not shared:
        conv = algebra.CONV_MODULES[rank](weight.shape[1] * groups, weight.shape[0],
                                          tuple(weight.shape[2:]), stride, padding, dilation,
                                          groups, bias=bias is not None)
        conv.weight = cz.parameter(weight)
        if bias is not None:
            conv.bias = cz.parameter(bias)
        computed = cz.weight_parametrization(w, weight)
        if computed is not None:  # the weight keeps its computation, a parametrization
            conv.weight = computed[0]
            parametrize.register_parametrization(conv, "weight", computed[1], unsafe=True)
    cz.install(node, conv, name, x)
    for arg in (w, b):  # a computed weight's nodes go (folded, or kept in the conv)
        cz.erase_unused(arg)
    return True


def _static_padding_conv(cz: Canonicaliser, node: fx.Node) -> bool:
    """An `nn.Conv1d/2d/3d` with string padding gets the integer padding it means."""
    m = cz.gm.get_submodule(node.target)
    if type(m) not in ops.CONVS or not isinstance(m.padding, str) or ops.has_hooks(m):
        return False
    padding = ops.static_padding(m.padding, m.kernel_size, m.stride, m.dilation)
    if padding is not None:
        static = copy.copy(m)
        static._parameters = dict(m._parameters)  # same parameters, own padding
        static.padding = padding
        cz.gm.add_submodule(node.target, static)
    return False  # the node stays as it is


def _read_conv(reader: AffineReader, node: fx.Node, strict: bool):
    """Compose the conv onto what it reads."""
    module = ops.module_of(reader.gm, node)
    if ops.conv_refusal(module) is not None:
        return reader.refuse(node, strict, "unknown or non-linear op inside a block")
    if ops.excluded(node.target, reader.exclude):
        return reader.refuse(node, strict, "the conv is excluded from merging")
    inner = reader.read(node.args[0], strict=strict)
    return inner and algebra.compose(inner, algebra.from_conv(module), reader.max_bytes)


def _refuse_functional_conv(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in CONV_FUNCTIONS and any(
            isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:2]):
        return "a functional conv of constant weights (not an nn.Conv1d/2d/3d call)"
    return None


register(OpFamily(
    "conv", NodeKind.CONV, lambda gm, n: module_is(gm, n, ops.CONVS),
    {**functions(CONV_FUNCTIONS, _canonical_conv),
     **dict.fromkeys(ops.CONVS, _static_padding_conv)},
    _read_conv, _refuse_functional_conv))
