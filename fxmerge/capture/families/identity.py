"""What leaves the graph at capture: identities, dropout and drop path in eval mode,
`x / 1`, `x + 0`, shape assertions."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import ops
from ..canonical import Canonicaliser
from ..registry import ANY, NodeKind, OpFamily, register

aten = torch.ops.aten


IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT = (F.dropout, F.dropout2d, aten.dropout.default)
_DIV = (operator.truediv, torch.div, aten.div.Tensor)


def _identity_of(cz: Canonicaliser, node: fx.Node) -> fx.Node | None:
    """The argument a call node computes unchanged, if any."""
    t, args = node.target, node.args
    if node.op != "call_function":  # not contiguous(): a later view may need its layout
        return None
    if t in ops.ADD_FUNCTIONS and len(args) == 2 and not node.kwargs:  # MobileOne adds an
        for x, zero in (args, args[::-1]):                       # absent branch as 0
            if isinstance(x, fx.Node) and not isinstance(zero, fx.Node) and zero == 0 \
                    and not isinstance(zero, bool):
                return x
        return None
    if t in _DROPOUT:
        keep = not cz.arguments(node, ["input", "p", "training"], [None, 0.5, True])[2]
    elif t in _DIV or t in ops.MUL_FUNCTIONS:
        keep = len(args) == 2 and not node.kwargs and not isinstance(args[1], fx.Node) \
            and args[1] == 1
    elif getattr(t, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(
            t, "__module__", ""):
        _, p, _, training = cz.arguments(node, ["input", "p", "mode", "training"],
                                         [None, 0.0, "row", True])
        keep = not training or p == 0
    else:
        keep = False
    return args[0] if keep else None


def _drop_identity(cz: Canonicaliser, node: fx.Node) -> bool:
    """Identities (`nn.Identity`, dropout and drop path in eval mode, `x / 1`, `x + 0`)
    and shape assertions true on the example inputs leave the graph."""
    if node.op == "call_module":
        m = cz.gm.get_submodule(node.target)
        x = node.args[0] if type(m) in IDENTITY_MODULES and not ops.has_hooks(m) else None
    elif node.op == "call_function" and not node.users and (
            node.target is torch._assert or getattr(node.target, "__name__", "") == "_assert"):
        cz.gm.graph.erase_node(node)  # `torch._assert(cond, message)`
        return True
    else:
        x = _identity_of(cz, node)
    if x is None:
        return False
    node.replace_all_uses_with(x)
    cz.gm.graph.erase_node(node)
    return True


def _refuse_identity(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in IDENTITY_MODULES and not ops.has_hooks(module):
            return f"{type(module).__name__} is an identity left in the graph"
    return None


register(OpFamily("identity", NodeKind.BARRIER, lambda gm, n: False,
                  {ANY: _drop_identity, **dict.fromkeys(IDENTITY_MODULES, _drop_identity)},
                  refuse=_refuse_identity))
