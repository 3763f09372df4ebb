"""Map the graphs other tools produce onto one canonical form.

`torch.compile` backends see `torch.conv2d` / `F.batch_norm` calls with weights as
placeholders (or `get_attr` under freezing); `torch.export` gives ATen ops (`aten.conv2d`,
`aten.batch_norm`, `aten.relu_`, and after `run_decompositions()` `aten.convolution` and
`_native_batch_norm_legit_no_training`). Here each becomes what `symbolic_trace` gives: a
`call_module` node of an `nn.Conv2d` / `nn.BatchNorm2d` / activation module, named by the
original module path (from `nn_module_stack`), so plans keyed by module names apply to every
form. Nodes whose weights are not constants stay as they are (barriers).
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

_CONV = {torch.conv2d, F.conv2d, aten.conv2d.default, aten.convolution.default}
_NORM = {F.batch_norm, torch.batch_norm, aten.batch_norm.default,
         aten._native_batch_norm_legit_no_training.default}
_ACT = {aten.relu.default: nn.ReLU, aten.relu_.default: nn.ReLU,
        aten.silu.default: nn.SiLU, aten.silu_.default: nn.SiLU,
        aten.hardswish.default: nn.Hardswish, aten.hardswish_.default: nn.Hardswish,
        aten.gelu.default: nn.GELU}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default, F.hardtanh}  # (0, 6) is ReLU6
_ADD = {aten.add.Tensor, aten.add_.Tensor}


def module_path(node: fx.Node) -> str | None:
    """The original module path of a node, from `nn_module_stack` (dynamo or export)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path or None


class _Canonicaliser:
    def __init__(self, gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> None:
        self.gm = gm
        self.inputs = inputs
        self.used_names: set[str] = set()
        self.counter = 0

    def constant(self, arg) -> torch.Tensor | None:
        """The tensor behind a weight argument, if it is a constant of the graph."""
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = self.gm
            for part in arg.target.split("."):
                value = getattr(value, part)
            return value
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in self.inputs:
            return self.inputs[arg.name]
        raise ValueError(f"weight {arg} is not a constant of the graph")

    def name_for(self, node: fx.Node, kind: str) -> str:
        path = module_path(node)
        if path is None or path in self.used_names:
            self.counter += 1
            path = f"fxmerge_{kind}_{self.counter}"
        self.used_names.add(path)
        return path

    def replace(self, node: fx.Node, module: nn.Module, kind: str, x: fx.Node) -> None:
        name = self.name_for(node, kind)
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def conv(self, node: fx.Node) -> None:
        args = list(node.args)
        if node.target is aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, _, groups = args
            if transposed:
                return
        else:
            names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
            defaults = [None, None, None, 1, 0, 1, 1]
            values = dict(zip(names, defaults))
            values.update(zip(names, args))
            values.update(node.kwargs)
            x, w, b, stride, padding, dilation, groups = (values[n] for n in names)
        try:
            weight, bias = self.constant(w), self.constant(b)
        except ValueError:
            return
        if weight.dim() != 4 or isinstance(padding, str):
            return
        pair = lambda v: tuple(v) if isinstance(v, Sequence) else (v, v)
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         pair(stride), pair(padding), pair(dilation), groups,
                         bias=bias is not None)
        conv.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
        if bias is not None:
            conv.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.replace(node, conv, "conv", x)

    def norm(self, node: fx.Node) -> None:
        args = list(node.args)
        t = node.target
        if t is aten._native_batch_norm_legit_no_training.default:
            x, w, b, mean, var, momentum, eps = args
            training = False
        elif t is aten.batch_norm.default:
            x, w, b, mean, var, training, momentum, eps = args[:8]
        else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)
            names = ["input", "running_mean", "running_var", "weight", "bias", "training",
                     "momentum", "eps"]
            values = dict(zip(names, [None] * 5 + [False, 0.1, 1e-5]))
            values.update(zip(names, args))
            values.update(node.kwargs)
            x, mean, var, w, b, training, momentum, eps = (values[n] for n in names)
        try:
            tensors = [self.constant(a) for a in (w, b, mean, var)]
        except ValueError:
            return
        if tensors[2] is None or tensors[3] is None:
            return
        weight, bias, running_mean, running_var = tensors
        bn = nn.BatchNorm2d(running_mean.numel(), eps=eps, momentum=momentum,
                            affine=weight is not None)
        bn.running_mean, bn.running_var = running_mean.detach(), running_var.detach()
        if weight is not None:
            bn.weight = nn.Parameter(weight.detach())
            bn.bias = nn.Parameter(bias.detach())
        bn.train(bool(training))
        if t is aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                return
            for u in users:
                u.replace_all_uses_with(node)
                self.gm.graph.erase_node(u)
        self.replace(node, bn, "norm", x)

    def activation(self, node: fx.Node) -> None:
        if node.target in _HARDTANH:
            low, high = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args[1:3]):])
            low = node.kwargs.get("min_val", low)
            high = node.kwargs.get("max_val", high)
            if (low, high) != (0.0, 6.0):
                return
            self.replace(node, nn.ReLU6(), "act", node.args[0])
        else:
            self.replace(node, _ACT[node.target](), "act", node.args[0])

    def add(self, node: fx.Node) -> None:
        if len(node.args) == 2 and not node.kwargs and all(
                isinstance(a, fx.Node) for a in node.args):
            node.target = operator.add

    def run(self) -> fx.GraphModule:
        for node in list(self.gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _CONV:
                self.conv(node)
            elif node.target in _NORM:
                self.norm(node)
            elif node.target in _ACT or node.target in _HARDTANH:
                self.activation(node)
            elif node.target in _ADD:
                self.add(node)
        for node in reversed(list(self.gm.graph.nodes)):
            if node.op == "get_attr" and not node.users:
                self.gm.graph.erase_node(node)
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


def canonicalize(gm: fx.GraphModule, inputs: Sequence[torch.Tensor] = ()) -> fx.GraphModule:
    """A copy of `gm` in canonical form. `inputs` are the values of its placeholders (a
    dynamo backend's `example_inputs`): placeholders holding weights become constants."""
    if not any(n.op == "call_function" and (n.target in _CONV or n.target in _NORM)
               for n in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = {name: t for name, t in zip(placeholders, inputs) if isinstance(t, torch.Tensor)}
    return _Canonicaliser(gm, values).run()
