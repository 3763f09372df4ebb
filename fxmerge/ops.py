"""Recognise the FX nodes fxmerge understands; everything else is a barrier."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.GELU: "gelu",
}
ACTIVATION_CLASSES: dict[str, type] = {kind: cls for cls, kind in ACTIVATION_MODULES.items()}
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.hardswish: "hardswish",
    F.gelu: "gelu",
}
ACTIVATION_METHODS = {"relu": "relu"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), nn.Conv2d)


def conv_refusal(conv: nn.Conv2d) -> str | None:
    """Why fxmerge cannot search over this conv, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if isinstance(conv.padding, str):
        return f"string padding {conv.padding!r}"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    for attr in ("kernel_size", "stride", "padding", "dilation"):
        value = getattr(conv, attr)
        if value[0] != value[1]:
            return f"non-square {attr} {tuple(value)}"
    return None


def is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), nn.BatchNorm2d)


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu', 'relu6', ... when `node` is an elementwise activation of one tensor."""
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(module_of(gm, node)))
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS and len(node.args) == 1:
        return ACTIVATION_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in ACTIVATION_METHODS and len(node.args) == 1:
        return ACTIVATION_METHODS[node.target]
    return None


def is_add(node: fx.Node) -> bool:
    """A plain `a + b` of two graph values (no alpha, no scalars)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs and all(
            isinstance(a, fx.Node) for a in node.args
        )
    if node.op == "call_method" and node.target == "add":
        return len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node)
    return False


def pad_amount(node: fx.Node) -> int | None:
    """The symmetric spatial amount of an `F.pad(x, (p, p, p, p))` node (negative crops)."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", "constant")
    value = node.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or len(node.args) > 2:
        return None
    if not isinstance(pads, (list, tuple)) or len(pads) != 4 or len(set(pads)) != 1:
        return None
    return int(pads[0])


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of `node`, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise KeyError(node.name)
    return tuple(meta.shape)
