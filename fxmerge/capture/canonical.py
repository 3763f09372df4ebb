"""Map every graph form onto the canonical vocabulary of `fxmerge.capture.ops`.

`symbolic_trace` gives `call_module` convs and norms, but traces through the zoos' own layers
(timm's `BatchNormAct2d` becomes `F.batch_norm` + `Identity` + activation). `torch.compile`
backends see `torch.conv2d` / `F.batch_norm` with weights as placeholders; `torch.export`
gives ATen ops (`aten.conv2d`, `aten.batch_norm`, `aten.relu_`, and after
`run_decompositions()` `aten.convolution`, `_native_batch_norm_legit_no_training`).

Here each conv and foldable norm whose weights are constants of the graph becomes a
`call_module` node named by the original module path; activations in any form become
activation modules (`x * sigmoid(x)` is SiLU); identities (`nn.Identity`, dropout and drop
path in eval mode, `x / 1.0`) disappear; `a + b` becomes `operator.add` where that is what it
computes. A weight that is a forward input stays an input, and its conv a barrier.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .ops import has_hooks

aten = torch.ops.aten

CONV_FUNCTIONS = {torch.conv2d, F.conv2d, aten.conv2d.default, aten.conv2d.padding,
                  aten.convolution.default}
_NORM = {F.batch_norm, torch.batch_norm, aten.batch_norm.default,
         aten._native_batch_norm_legit_no_training.default}
_GROUP_NORM = {F.group_norm, aten.group_norm.default}
ACTIVATION_FUNCTIONS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, aten.relu.default: nn.ReLU,
        aten.relu_.default: nn.ReLU, F.relu6: nn.ReLU6, aten.relu6.default: nn.ReLU6,
        aten.relu6_.default: nn.ReLU6, F.silu: nn.SiLU,
        aten.silu.default: nn.SiLU, aten.silu_.default: nn.SiLU, F.hardswish: nn.Hardswish,
        aten.hardswish.default: nn.Hardswish, aten.hardswish_.default: nn.Hardswish,
        F.gelu: nn.GELU, aten.gelu.default: nn.GELU, F.mish: nn.Mish, aten.mish.default: nn.Mish,
        F.leaky_relu: nn.LeakyReLU, aten.leaky_relu.default: nn.LeakyReLU,
        aten.leaky_relu_.default: nn.LeakyReLU}
_ACT_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default, F.hardtanh}  # (0, 6) is ReLU6
_SIGMOID = {torch.sigmoid, F.sigmoid, aten.sigmoid.default}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_DIV = {operator.truediv, torch.div, aten.div.Tensor}
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_IN_PLACE_ADD = {operator.iadd, aten.add_.Tensor}
_DROPOUT = {F.dropout, F.dropout2d, aten.dropout.default}
_SHAPE_READS = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                operator.ge, operator.and_, len, "size", "dim"}
_TRACER_VALUES = ("example_value", "val", "tensor_dict", "grapharg")
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


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


def _is_parameter_input(node: fx.Node) -> bool:
    """A dynamo placeholder that holds a parameter or buffer of the module (not a forward
    input): dynamo marks those as static inputs and names them after their attribute
    (`l_self_modules_conv1_parameters_weight_`); older releases record their source."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is not None:
        name = source.name() if callable(source.name) else str(source.name)
        return "_parameters[" in name or "_buffers[" in name
    static = "_dynamo_static_input_type" in node.meta.get("tensor_dict", {})
    return static and ("_parameters_" in node.name or "_buffers_" in node.name)


def _static_padding(padding: Any, kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> tuple[int, int] | None:
    """Integer padding equal to a string one, or None when 'same' is not symmetric."""
    if not isinstance(padding, str):
        return tuple(padding) if isinstance(padding, Sequence) else (padding, padding)
    if padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(s != 1 for s in stride) or any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def _args(node: fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return [values[n] for n in names]


class _Canonicaliser:
    def __init__(self, gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> None:
        self.gm = gm
        self.inputs = inputs
        self.installed: dict[str, tuple[int, str]] = {}  # path -> (id of weight, name)
        self.counter = 0

    # ---- constants and names ----------------------------------------------------------
    def constant(self, arg: Any) -> torch.Tensor | None:
        """The tensor behind a weight argument, if it is a constant of the graph."""
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = self.gm
            for part in arg.target.split("."):
                value = getattr(value, part)
            return value
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in self.inputs \
                and _is_parameter_input(arg):
            return self.inputs[arg.name]
        raise ValueError(f"{arg} is not a constant of the graph")

    def name_for(self, node: fx.Node, weight_arg: Any, weight: torch.Tensor | None,
                 kind: str) -> tuple[str, bool]:
        """A module name for `node` and whether that module is already installed (the same
        weights called again: one module, several call sites). A conv or norm is named
        after the module that owns its weight; an activation, which has no state, gets a
        fresh name (the module around a functional call is not the activation's own)."""
        path = None
        if kind != "act":
            if isinstance(weight_arg, fx.Node) and weight_arg.op == "get_attr":
                path = weight_arg.target.rpartition(".")[0] or None
            else:
                path = module_path(node)
        if path is not None and path in self.installed:
            weight_id, name = self.installed[path]
            if weight is not None and weight_id == id(weight):
                return name, True
            path = None
        if path is not None:
            try:
                existing = self.gm.get_submodule(path)
            except AttributeError:
                existing = None
            if existing is not None and type(existing) is not nn.Module:
                path = None  # a real module lives there: do not replace it
        if path is None:
            self.counter += 1
            path = f"fxmerge_{kind}_{self.counter}"
        self.installed[path] = (id(weight), path)
        return path, False

    def install(self, node: fx.Node, module: nn.Module | None, name: str, x: fx.Node) -> None:
        """Replace `node` by a call of module `name` (installed first unless None)."""
        if module is not None:
            try:
                holder = self.gm.get_submodule(name)
                for child_name, child in holder.named_children():
                    module.add_module(child_name, child)
            except AttributeError:
                pass
            self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def bypass(self, node: fx.Node, x: fx.Node) -> None:
        node.replace_all_uses_with(x)
        self.gm.graph.erase_node(node)

    # ---- ops -----------------------------------------------------------------------------
    def conv(self, node: fx.Node) -> None:
        if node.target is aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, _, groups = node.args
            if transposed:
                return
        else:
            x, w, b, stride, padding, dilation, groups = _args(
                node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                [None, None, None, 1, 0, 1, 1])
        try:
            weight, bias = self.constant(w), self.constant(b)
        except ValueError:
            return
        if weight.dim() != 4:
            return
        pair = lambda v: tuple(v) if isinstance(v, Sequence) else (v, v)
        stride, dilation = pair(stride), pair(dilation)
        padding = _static_padding(padding, weight.shape[2:], stride, dilation)
        if padding is None:
            return
        name, shared = self.name_for(node, w, weight, "conv")
        conv = None
        if not shared:
            conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                             stride, padding, dilation, groups, bias=bias is not None)
            conv.weight = _parameter(weight)
            if bias is not None:
                conv.bias = _parameter(bias)
        self.install(node, conv, name, x)

    def norm(self, node: fx.Node) -> None:
        t = node.target
        if t is aten._native_batch_norm_legit_no_training.default:
            x, w, b, mean, var, momentum, eps = node.args
            training = False
        elif t is aten.batch_norm.default:
            x, w, b, mean, var, training, momentum, eps = node.args[:8]
        else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)
            x, mean, var, w, b, training, momentum, eps = _args(
                node, ["input", "running_mean", "running_var", "weight", "bias", "training",
                       "momentum", "eps"], [None] * 5 + [False, 0.1, 1e-5])
        try:
            weight, bias, running_mean, running_var = (self.constant(a) for a in (w, b, mean,
                                                                                 var))
        except ValueError:
            return
        if training or running_mean is None or running_var is None or _rank(x) not in (None, 4):
            return  # (a BatchNorm1d stays as it is: a barrier)
        if t is aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                return
            for u in users:
                u.replace_all_uses_with(node)
                self.gm.graph.erase_node(u)
        bn = nn.BatchNorm2d(running_mean.numel(), eps=eps, momentum=momentum,
                            affine=weight is not None or bias is not None)
        bn.running_mean, bn.running_var = running_mean.detach(), running_var.detach()
        name, shared = self.name_for(node, mean, running_mean, "norm")
        self.install(node, None if shared else _set_affine(bn, weight, bias).eval(), name, x)

    def group_norm(self, node: fx.Node) -> None:
        x, groups, w, b, eps = _args(node, ["input", "num_groups", "weight", "bias", "eps"],
                                     [None, None, None, None, 1e-5])
        try:
            weight, bias = self.constant(w), self.constant(b)
        except ValueError:
            return
        if weight is None and bias is None:
            return  # without affine parameters its channels are not known here: a barrier
        norm = nn.GroupNorm(groups, (weight if weight is not None else bias).numel(), eps=eps)
        name, shared = self.name_for(node, w, weight, "norm")
        self.install(node, None if shared else _set_affine(norm, weight, bias), name, x)

    def activation(self, node: fx.Node, cls: type) -> None:
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
            return
        self.install_activation(node, module, node.args[0])

    def install_activation(self, node: fx.Node, module: nn.Module, x: fx.Node) -> None:
        name, _ = self.name_for(node, None, None, "act")
        self.install(node, module, name, x)

    def hardtanh(self, node: fx.Node) -> None:
        x, low, high = _args(node, ["input", "min_val", "max_val"], [None, -1.0, 1.0])[:3]
        if (low, high) == (0.0, 6.0):
            self.install_activation(node, nn.ReLU6(), x)

    def swish(self, node: fx.Node) -> None:
        """`x * sigmoid(x)` (either order) is SiLU."""
        if len(node.args) != 2 or node.kwargs:
            return
        for x, s in (node.args, node.args[::-1]):
            if (isinstance(s, fx.Node) and len(s.users) == 1 and len(s.args) == 1
                    and s.args[0] is x and ((s.op == "call_function" and s.target in _SIGMOID)
                                            or (s.op == "call_method" and s.target == "sigmoid"))):
                self.install_activation(node, nn.SiLU(), x)
                self.gm.graph.erase_node(s)
                return

    def add(self, node: fx.Node) -> None:
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            return
        if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
            return
        if node.target in _IN_PLACE_ADD and len(node.args[0].users) > 1:
            return  # the in-place result is seen through another alias: keep it as it is
        node.target, node.kwargs = operator.add, {}

    def identity_of(self, node: fx.Node) -> fx.Node | None:
        """The argument a call_function / call_method node computes unchanged, if any."""
        t, args = node.target, node.args
        if node.op == "call_method":  # not contiguous(): a later view may need its layout
            return None
        if t in _ADD and len(args) == 2 and not node.kwargs:  # MobileOne adds an absent
            for x, zero in (args, args[::-1]):                # branch as the integer 0
                if isinstance(x, fx.Node) and not isinstance(zero, fx.Node) and zero == 0 \
                        and not isinstance(zero, bool):
                    return x
            return None
        if t in _DROPOUT:
            keep = not _args(node, ["input", "p", "training"], [None, 0.5, True])[2]
        elif t in _DIV or t in _MUL:
            keep = len(args) == 2 and not node.kwargs and not isinstance(args[1], fx.Node) \
                and args[1] == 1
        elif getattr(t, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(
                t, "__module__", ""):
            _, p, _, training = _args(node, ["input", "p", "mode", "training"],
                                      [None, 0.0, "row", True])
            keep = not training or p == 0
        else:
            keep = False
        return args[0] if keep else None

    def module(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        if type(m) in IDENTITY_MODULES and not has_hooks(m):
            self.bypass(node, node.args[0])
        elif type(m) is nn.Conv2d and isinstance(m.padding, str):
            padding = _static_padding(m.padding, m.kernel_size, m.stride, m.dilation)
            if padding is not None and not has_hooks(m):
                static = copy.copy(m)
                static._parameters = dict(m._parameters)  # same parameters, own padding
                static.padding = padding
                self.gm.add_submodule(node.target, static)

    def run(self) -> fx.GraphModule:
        handlers = {**dict.fromkeys(CONV_FUNCTIONS, self.conv), **dict.fromkeys(_NORM, self.norm),
                    **dict.fromkeys(_GROUP_NORM, self.group_norm),
                    **{t: partial(self.activation, cls=cls)
                       for t, cls in ACTIVATION_FUNCTIONS.items()},
                    **dict.fromkeys(_HARDTANH, self.hardtanh), **dict.fromkeys(_MUL, self.swish),
                    **dict.fromkeys(_ADD, self.add)}
        for node in list(self.gm.graph.nodes):
            t = node.target
            if node.op == "call_module":
                self.module(node)
            elif node.op == "call_method" and t in _ACT_METHODS and len(node.args) == 1:
                self.activation(node, _ACT_METHODS[t])
            elif node.op not in ("call_function", "call_method"):
                continue
            elif _is_assert(node):  # a shape check, true on the example inputs
                self.gm.graph.erase_node(node)
            elif self.identity_of(node) is not None:
                self.bypass(node, self.identity_of(node))
            elif node.op == "call_function" and t in handlers:
                handlers[t](node)
        for node in reversed(list(self.gm.graph.nodes)):
            if not node.users and (node.op == "get_attr" or node.target in _SHAPE_READS):
                self.gm.graph.erase_node(node)
            for key in _TRACER_VALUES:  # fake tensors of the tracer's mode; shapes are redone
                node.meta.pop(key, None)
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


def _rank(node: Any) -> int | None:
    """The number of dimensions of a node's value, where the tracer recorded it."""
    for key in ("val", "example_value", "tensor_meta"):
        value = node.meta.get(key) if isinstance(node, fx.Node) else None
        if value is not None and hasattr(value, "shape"):
            return len(value.shape)
    return None


def _is_assert(node: fx.Node) -> bool:
    """`torch._assert(cond, message)` (timm checks `x.ndim == 4` after every norm)."""
    return node.op == "call_function" and not node.users and (
        node.target is torch._assert or getattr(node.target, "__name__", "") == "_assert")


def _set_affine(norm: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None
                ) -> nn.Module:
    """Give a norm the graph's affine parameters: a missing weight is 1, a missing bias 0
    (weight None is not `affine=False` when a bias is given)."""
    if weight is not None or bias is not None:
        norm.weight = _parameter(weight if weight is not None else torch.ones_like(bias))
        norm.bias = _parameter(bias if bias is not None else torch.zeros_like(weight))
    return norm


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def canonicalize(gm: fx.GraphModule, inputs: Sequence[Any] = ()) -> fx.GraphModule:
    """`gm` in canonical form, changed in place (pass a copy). `inputs` are the values of its
    placeholders (a dynamo backend's `example_inputs`): those dynamo lifted from the module's
    parameters become constants; forward inputs stay inputs."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = {name: t for name, t in zip(placeholders, inputs) if isinstance(t, torch.Tensor)}
    return _Canonicaliser(gm, values).run()
