"""Readers of a canonical graph's nodes: the module a node calls (none where it has hooks:
they would vanish from a merged network), how often a module is called, a node's shape,
and the data of the nodes some op families are made of (pads, per-channel scales,
conditioning adds). Which family a node is of is `families`' to say."""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..algebra import CONV_MODULES

aten = torch.ops.aten
# the targets of the add and multiply op families, every graph form (tensor methods aside):
# `PLAIN_ADD` is what a canonical graph's adds are (the add family rewrites the others)
PLAIN_ADD = (operator.add, torch.add)
ADD_FUNCTIONS = (*PLAIN_ADD, operator.iadd, aten.add.Tensor, aten.add_.Tensor)
IN_PLACE_ADD = (operator.iadd, aten.add_.Tensor)
MUL_FUNCTIONS = (operator.mul, torch.mul, aten.mul.Tensor)


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks change what a module computes, invisibly to the graph."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, unless it has hooks; else None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return None if has_hooks(module) else module


def call_sites(gm: fx.GraphModule) -> dict[str, int]:
    """How many `call_module` nodes call each module."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` matches one of the `exclude` glob patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


CONVS = tuple(CONV_MODULES.values())  # nn.Conv1d, nn.Conv2d, nn.Conv3d


def is_conv(module: Any) -> bool:
    """A plain `nn.Conv1d/2d/3d` (or one whose weight is parametrized), not a subclass."""
    kind = type(module)
    parametrized = getattr(module, "parametrizations", None) is not None
    return kind in CONVS or (parametrized and kind.__bases__[0] in CONVS)


def conv_refusal(conv: nn.Module) -> str | None:
    """Why fxmerge cannot search over this conv, or None when it can: a plain conv of any
    spatial rank with integer zero padding (kernel, stride, padding and dilation may differ
    between axes)."""
    if not is_conv(conv):
        return f"{type(conv).__name__} is not a plain nn.Conv1d/2d/3d"
    if isinstance(conv.padding, str):
        return f"string padding {conv.padding!r}"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    return None


def channel_scale(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """`(x, scale)` for `x * scale` with `scale` a constant of the graph holding one value
    per channel (`(C, 1, 1)` or `(1, C, 1, 1)` in 2-D), in either order; else None."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) \
            or node.kwargs or len(node.args) != 2:
        return None
    for x, s in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and isinstance(s, fx.Node) and s.op == "get_attr":
            value = gm
            for part in s.target.split("."):
                value = getattr(value, part, None)
            shape = _shape(x)
            ones = (1,) * (len(shape) - 2) if shape is not None else ()
            if isinstance(value, torch.Tensor) and shape is not None and len(shape) >= 3 \
                    and tuple(value.shape) in ((shape[1], *ones), (1, shape[1], *ones)):
                return x, value.detach().reshape(-1)
    return None


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_add(node: fx.Node) -> bool:
    """A plain `a + b` of two graph values of one shape (no alpha, no broadcasting)."""
    if node.op == "call_function" and node.target in PLAIN_ADD:
        plain = len(node.args) == 2 and not node.kwargs and all(
            isinstance(a, fx.Node) for a in node.args)
    elif node.op == "call_method" and node.target == "add":
        plain = len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node)
    else:
        return False
    shapes = [_shape(a) for a in node.args]
    return plain and shapes[0] is not None and shapes[0] == shapes[1]


def conditioning_add(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`(main, condition)` for `main + condition` where the condition is one vector per
    sample (or one for all), broadcast over the map: `(B|1, C, 1, 1)` onto `(B, C, H, W)`
    (and alike in 1-D and 3-D)."""
    if node.op != "call_function" or node.target not in PLAIN_ADD or node.kwargs \
            or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    for main, cond in (node.args, node.args[::-1]):
        m, c = _shape(main), _shape(cond)
        if m is not None and c is not None and len(m) == len(c) >= 3 and set(c[2:]) == {1} \
                and set(m[2:]) != {1} and c[1] == m[1] and c[0] in (1, m[0]):
            return main, cond
    return None


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node` is computed from."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def pad_amounts(node: fx.Node) -> tuple[int, ...] | None:
    """The amount per spatial dimension, first to last (rows, columns in 2-D), of an
    `F.pad(x, (..., c, c, r, r))` node: zeros on both sides of each (negative crops); 0 for
    the dimensions it leaves alone, where the input's rank is known."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", "constant")
    value = node.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or len(node.args) > 2:
        return None
    if not isinstance(pads, (list, tuple)) or not pads or len(pads) % 2 \
            or any(pads[k] != pads[k + 1] for k in range(0, len(pads), 2)):
        return None
    amounts = [int(pads[k]) for k in range(len(pads) - 2, -1, -2)]
    spatial = (rank(node.args[0]) or 0) - 2
    return tuple([0] * (spatial - len(amounts)) + amounts)


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of `node`, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    shape = _shape(node)
    if shape is None:
        raise KeyError(node.name)
    return shape


def rank(node: Any) -> int | None:
    """The number of dimensions of a node's value, where the tracer recorded it."""
    for key in ("val", "example_value", "tensor_meta"):
        value = node.meta.get(key) if isinstance(node, fx.Node) else None
        if value is not None and hasattr(value, "shape"):
            return len(value.shape)
    return None


def static_padding(padding: Any, kernel: Sequence[int], stride: Sequence[int],
                   dilation: Sequence[int]) -> tuple[int, ...] | None:
    """Integer padding equal to a string one, or None when 'same' is not symmetric."""
    if not isinstance(padding, str):
        return tuple(padding) if isinstance(padding, Sequence) else (padding,) * len(kernel)
    if padding == "valid":
        return (0,) * len(kernel)
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(s != 1 for s in stride) or any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)
