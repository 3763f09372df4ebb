"""Activations: every functional, method and in-place form becomes its module; never
merged through."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import ops
from ..canonical import Canonicaliser, NotConstant
from ..registry import NodeKind, OpFamily, functions, register

aten = torch.ops.aten


ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu", nn.Mish: "mish", nn.ELU: "elu",
    nn.PReLU: "prelu",  # (its slopes are parameters: kept where it stays, gone where removed)
}
ACTIVATION_CLASSES: dict[str, type] = {kind: cls for cls, kind in ACTIVATION_MODULES.items()}
ACTIVATION_FUNCTIONS = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, aten.relu.default: nn.ReLU, aten.relu_.default: nn.ReLU,
    F.relu6: nn.ReLU6, aten.relu6.default: nn.ReLU6, aten.relu6_.default: nn.ReLU6,
    F.silu: nn.SiLU, aten.silu.default: nn.SiLU, aten.silu_.default: nn.SiLU,
    F.hardswish: nn.Hardswish, aten.hardswish.default: nn.Hardswish,
    aten.hardswish_.default: nn.Hardswish, F.gelu: nn.GELU, aten.gelu.default: nn.GELU,
    F.mish: nn.Mish, aten.mish.default: nn.Mish, F.leaky_relu: nn.LeakyReLU,
    aten.leaky_relu.default: nn.LeakyReLU, aten.leaky_relu_.default: nn.LeakyReLU,
    "relu": nn.ReLU, "relu_": nn.ReLU,  # tensor methods
}
_HARDTANH = (aten.hardtanh.default, aten.hardtanh_.default, F.hardtanh)  # (0, 6) is ReLU6
_SIGMOID = (torch.sigmoid, F.sigmoid, aten.sigmoid.default)


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu', 'relu6', ... when `node` calls an activation module."""
    m = ops.module_of(gm, node)
    return ACTIVATION_MODULES.get(type(m)) if m is not None else None


def _canonical_activation(cz: Canonicaliser, node: fx.Node) -> bool:
    """Every functional and method form of an activation becomes its module."""
    if node.op == "call_method" and len(node.args) != 1:
        return False
    cls = ACTIVATION_FUNCTIONS[node.target]
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)
    args = node.args[1:]
    if cls is nn.GELU:
        approximate = kwargs.pop("approximate", args[0] if args else "none")
        args, module = (), nn.GELU(approximate=approximate)
    elif cls is nn.LeakyReLU:
        slope = kwargs.pop("negative_slope", args[0] if args else 0.01)
        args, module = args[1:], nn.LeakyReLU(slope)
    else:
        module = cls()
    if kwargs or any(not isinstance(a, bool) for a in args):  # only an inplace flag
        return False
    cz.install_activation(node, module, node.args[0])
    return True


def _canonical_hardtanh(cz: Canonicaliser, node: fx.Node) -> bool:
    x, low, high = cz.arguments(node, ["input", "min_val", "max_val"], [None, -1.0, 1.0])[:3]
    if (low, high) != (0.0, 6.0):
        return False
    cz.install_activation(node, nn.ReLU6(), x)
    return True


def _canonical_swish(cz: Canonicaliser, node: fx.Node) -> bool:
    """`x * sigmoid(x)` (either order) is SiLU."""
    if len(node.args) != 2 or node.kwargs:
        return False
    for x, s in (node.args, node.args[::-1]):
        if (isinstance(s, fx.Node) and len(s.users) == 1 and len(s.args) == 1
                and s.args[0] is x and ((s.op == "call_function" and s.target in _SIGMOID)
                                        or (s.op == "call_method" and s.target == "sigmoid"))):
            cz.install_activation(node, nn.SiLU(), x)
            cz.gm.graph.erase_node(s)
            return True
    return False


_PRELU = (F.prelu, torch.prelu, aten.prelu.default, aten._prelu_kernel.default)


def _canonical_prelu(cz: Canonicaliser, node: fx.Node) -> bool:
    """`prelu(x, weight)` of a constant weight (one slope, or one per channel) is PReLU."""
    x, w = cz.arguments(node, ["input", "weight"], [None, None])
    try:
        weight = cz.constant(w)
    except NotConstant:
        return False
    if weight is None or weight.dim() != 1:
        return False
    module = nn.PReLU(weight.numel())
    module.weight = cz.parameter(weight)
    cz.install_activation(node, module, x)
    cz.erase_unused(w)
    return True


def _out_of_place(cz: Canonicaliser, node: fx.Node) -> bool:
    """An in-place activation module becomes an out-of-place copy: once prune bypasses the
    conv before it, its input can be a value something else reads too."""
    module = cz.gm.get_submodule(node.target)
    if getattr(module, "inplace", False) and not ops.has_hooks(module):
        module = copy.copy(module)
        module.inplace = False
        cz.gm.add_submodule(node.target, module)
    return False  # the node stays as it is


def _refuse_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS \
            and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}:
        return "a functional activation (not an activation module)"
    module = ops.module_of(gm, node) if activation_kind(gm, node) is not None else None
    if getattr(module, "inplace", False):
        return "an in-place activation module"
    return None


register(OpFamily(
    "activation", NodeKind.ACTIVATION, lambda gm, n: activation_kind(gm, n) is not None,
    {**functions(ACTIVATION_FUNCTIONS, _canonical_activation),
     **functions(_HARDTANH, _canonical_hardtanh), **functions(ops.MUL_FUNCTIONS, _canonical_swish),
     **functions(_PRELU, _canonical_prelu), **functions(tuple(ACTIVATION_MODULES), _out_of_place)},
    None, _refuse_activation))
