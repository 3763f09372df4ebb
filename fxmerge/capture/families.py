"""The op families fxmerge understands, each declared once: its node kind, the canonical
form its other graph forms are rewritten to, its reading as an affine map, the invariant a
canonical graph keeps about it and its label in reports (inductor's one rule per op
family; Torch-Pruning's op kinds). Anything no family matches is a barrier.

`register(OpFamily(...))` adds a family; capture tags every node's family in
`node.meta[KIND_META]` and the rest of fxmerge reads it there (`kind_of`, `family_of`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import algebra
from . import ops

if TYPE_CHECKING:
    from .affine import AffineReader
    from .canonical import Canonicaliser

aten = torch.ops.aten
KIND_META = "fxmerge_family"  # the name of a node's family, tagged at capture


class NodeKind(str, Enum):
    """What a graph node is to the search."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    GET_ATTR = "get_attr"
    CONV = "conv"
    NORM = "norm"  # folded into the conv before it (running statistics)
    GROUP_NORM = "group_norm"  # per-sample statistics: relocated, never folded
    ACTIVATION = "activation"
    ADD = "add"
    CONDITION = "condition"  # a vector per sample added to a map (a timestep embedding)
    SCALE = "scale"  # an affine map per channel (one branch of a region)
    PAD = "pad"
    BARRIER = "barrier"  # anything else: never merged through

    def __str__(self) -> str:
        return self.value


Rewrite = Callable[["Canonicaliser", fx.Node], bool]  # True once it replaced the node
Read = Callable[["AffineReader", fx.Node, bool], "algebra.AffineConv | None"]
ANY = "*"  # a rewrite key: tried on every call node before the target's own


@dataclass(frozen=True)
class OpFamily:
    """One op family. `match(gm, node)` recognises its canonical form; `rewrites` maps the
    targets (functions, method names, module classes, or `ANY`) of its other forms to the
    rewrite into the canonical one; `read` is its affine reading (None: not linear, so never
    merged through); `refuse(gm, node)` names a node left in a non-canonical form; `label`
    says what it is in reports."""

    name: str
    kind: NodeKind
    match: Callable[[fx.GraphModule, fx.Node], bool]
    rewrites: Mapping[Any, Rewrite] = field(default_factory=dict)
    read: Read | None = None
    refuse: Callable[[fx.GraphModule, fx.Node], str | None] | None = None
    label: str = ""


FAMILIES: dict[str, OpFamily] = {}  # in the order they are tried


def register(family: OpFamily) -> OpFamily:
    """Add `family` (or replace the one of its name); families are tried in order."""
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def classify(gm: fx.GraphModule, node: fx.Node) -> OpFamily | None:
    """The family `node` belongs to, by its match (None: a barrier or a graph input)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    return next((f for f in FAMILIES.values() if f.match(gm, node)), None)


def tag(gm: fx.GraphModule) -> fx.GraphModule:
    """Record every node's family in `node.meta[KIND_META]` ("" for none)."""
    for node in gm.graph.nodes:
        family = classify(gm, node)
        node.meta[KIND_META] = family.name if family else ""
    return gm


def family_of(gm: fx.GraphModule, node: fx.Node) -> OpFamily | None:
    """The family tagged on `node` at capture (a node made since is classified now)."""
    name = node.meta.get(KIND_META)
    if name is None or (name and name not in FAMILIES):
        return classify(gm, node)
    return FAMILIES[name] if name else None


def kind_of(gm: fx.GraphModule, node: fx.Node) -> NodeKind:
    """What `node` is to the search: its family's kind, else a barrier."""
    if node.op in ("placeholder", "output", "get_attr"):
        return NodeKind(node.op)
    family = family_of(gm, node)
    return family.kind if family else NodeKind.BARRIER


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The module's class or the function's name: `Conv2d`, `cat`, `mul`."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return str(node.target) if node.op == "call_method" else node.op


def label_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """What `node` is in reports: its family's label, else its op's name."""
    family = family_of(gm, node)
    return (family.label if family and family.label else "") or op_name(gm, node)


def data_input(node: fx.Node) -> fx.Node:
    """The one value a per-channel op transforms (its input that is not a constant)."""
    return next(a for a in node.all_input_nodes if a.op != "get_attr")


def _module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    return isinstance(ops.module_of(gm, node), types)


def _functions(targets: Sequence[Any], rewrite: Rewrite) -> dict[Any, Rewrite]:
    return dict.fromkeys(targets, rewrite)


# ---- conv ---------------------------------------------------------------------------------
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
    except ValueError:
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
    "conv", NodeKind.CONV, lambda gm, n: _module(gm, n, ops.CONVS),
    {**_functions(CONV_FUNCTIONS, _canonical_conv),
     **dict.fromkeys(ops.CONVS, _static_padding_conv)},
    _read_conv, _refuse_functional_conv))


# ---- BatchNorm (folded) -------------------------------------------------------------------
NORM_MODULES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d,
                                            3: nn.BatchNorm3d}  # by spatial rank
NORMS = {kind: rank for rank, kind in NORM_MODULES.items()}
NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm, aten.batch_norm.default,
                  aten._native_batch_norm_legit_no_training.default)


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A BatchNorm1d/2d/3d of a feature map (channels and at least one spatial dimension)
    that can be folded into the conv before it (running statistics)."""
    m = ops.module_of(gm, node)
    return (type(m) in NORMS and m.track_running_stats
            and ops.rank(node.args[0]) in (None, *(r + 2 for r in NORMS.values())))


def _canonical_norm(cz: Canonicaliser, node: fx.Node) -> bool:
    """A functional batch norm in eval mode, of constant statistics, on a feature map,
    becomes an `nn.BatchNorm1d/2d/3d` call (one of a `(batch, channels)` input stays as it
    is: a barrier)."""
    t = node.target
    if t is aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, momentum, eps = node.args
        training = False
    elif t is aten.batch_norm.default:
        x, w, b, mean, var, training, momentum, eps = node.args[:8]
    else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)
        x, mean, var, w, b, training, momentum, eps = cz.arguments(
            node, ["input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"], [None] * 5 + [False, 0.1, 1e-5])
    try:
        weight, bias, running_mean, running_var = (cz.constant(a) for a in (w, b, mean, var))
    except ValueError:
        return False
    spatial = (ops.rank(x) or 4) - 2
    if training or running_mean is None or running_var is None or spatial not in (1, 2, 3):
        return False
    if t is aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            return False
        for u in users:
            u.replace_all_uses_with(node)
            cz.gm.graph.erase_node(u)
    bn = NORM_MODULES[spatial](running_mean.numel(), eps=eps, momentum=momentum,
                               affine=weight is not None or bias is not None)
    bn.running_mean, bn.running_var = running_mean.detach(), running_var.detach()
    name, shared = cz.name_for(node, mean, running_mean, "norm")
    cz.install(node, None if shared else cz.set_affine(bn, weight, bias).eval(), name, x)
    return True


def _read_norm(reader: AffineReader, node: fx.Node, strict: bool):
    inner = reader.read(node.args[0], strict=strict)  # folded as in eval mode
    return inner and algebra.fold_bn(inner, ops.module_of(reader.gm, node))


register(OpFamily("norm", NodeKind.NORM, _is_norm,
                  _functions(NORM_FUNCTIONS, _canonical_norm), _read_norm))


# ---- GroupNorm (relocated) ----------------------------------------------------------------
def _canonical_group_norm(cz: Canonicaliser, node: fx.Node) -> bool:
    x, groups, w, b, eps = cz.arguments(node, ["input", "num_groups", "weight", "bias", "eps"],
                                        [None, None, None, None, 1e-5])
    try:
        weight, bias = cz.constant(w), cz.constant(b)
    except ValueError:
        return False
    if weight is None and bias is None:
        return False  # without affine parameters its channels are not known here: a barrier
    norm = nn.GroupNorm(groups, (weight if weight is not None else bias).numel(), eps=eps)
    name, shared = cz.name_for(node, w, weight, "norm")
    cz.install(node, None if shared else cz.set_affine(norm, weight, bias), name, x)
    return True


register(OpFamily(
    "group_norm", NodeKind.GROUP_NORM, lambda gm, n: type(ops.module_of(gm, n)) is nn.GroupNorm,
    _functions((F.group_norm, aten.group_norm.default), _canonical_group_norm)))


# ---- activations --------------------------------------------------------------------------
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
MUL_FUNCTIONS = (operator.mul, torch.mul, aten.mul.Tensor)


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
    except ValueError:
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
    {**_functions(ACTIVATION_FUNCTIONS, _canonical_activation),
     **_functions(_HARDTANH, _canonical_hardtanh), **_functions(MUL_FUNCTIONS, _canonical_swish),
     **_functions(_PRELU, _canonical_prelu), **_functions(tuple(ACTIVATION_MODULES), _out_of_place)},
    None, _refuse_activation))


# ---- add ----------------------------------------------------------------------------------
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor)
_IN_PLACE_ADD = (operator.iadd, aten.add_.Tensor)


def _canonical_add(cz: Canonicaliser, node: fx.Node) -> bool:
    """`a + b` in any form becomes `operator.add` where that is what it computes."""
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return False
    if node.target in _IN_PLACE_ADD and len(node.args[0].users) > 1:
        return False  # the in-place result is seen through another alias: keep it as it is
    node.target, node.kwargs = operator.add, {}
    return True


def _read_add(reader: AffineReader, node: fx.Node, strict: bool):
    parts = [reader.read(a, strict=strict) for a in node.args]
    return None if None in parts else algebra.add(*parts, reader.max_bytes)


register(OpFamily("add", NodeKind.ADD, lambda gm, n: ops.is_add(n),
                  _functions(ADD_FUNCTIONS, _canonical_add), _read_add))


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


# ---- what leaves the graph at capture -----------------------------------------------------
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT = (F.dropout, F.dropout2d, aten.dropout.default)
_DIV = (operator.truediv, torch.div, aten.div.Tensor)


def _identity_of(cz: Canonicaliser, node: fx.Node) -> fx.Node | None:
    """The argument a call node computes unchanged, if any."""
    t, args = node.target, node.args
    if node.op != "call_function":  # not contiguous(): a later view may need its layout
        return None
    if t in ADD_FUNCTIONS and len(args) == 2 and not node.kwargs:  # MobileOne adds an
        for x, zero in (args, args[::-1]):                       # absent branch as 0
            if isinstance(x, fx.Node) and not isinstance(zero, fx.Node) and zero == 0 \
                    and not isinstance(zero, bool):
                return x
        return None
    if t in _DROPOUT:
        keep = not cz.arguments(node, ["input", "p", "training"], [None, 0.5, True])[2]
    elif t in _DIV or t in MUL_FUNCTIONS:
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


# ---- barriers, by what they are -----------------------------------------------------------
def _named(*names: str) -> Callable[[fx.GraphModule, fx.Node], bool]:
    return lambda gm, n: n.op != "placeholder" and op_name(gm, n) in names


for _name, _label, _ops in (
        ("concatenation", "concatenation", ("cat", "stack")),
        ("product", "products (gates, attention)", ("mul",)),
        ("gate", "gates", ("sigmoid", "Sigmoid", "Hardsigmoid", "hardsigmoid")),
        ("pooling", "pooling", ("adaptive_avg_pool2d", "AdaptiveAvgPool2d", "mean",
                                "avg_pool2d", "AvgPool2d", "max_pool2d", "MaxPool2d")),
        ("upsampling", "upsampling", ("interpolate", "Upsample", "upsample_nearest2d",
                                      "upsample_bilinear2d", "ConvTranspose2d")),
        ("split", "splits and indexing", ("getitem", "split", "chunk", "split_with_sizes")),
        ("dropout", "dropout", ("Dropout", "dropout")),
        ("linear", "linear layers", ("Linear", "linear")),
        ("reshape", "reshapes", ("flatten", "view", "reshape", "Flatten", "permute"))):
    register(OpFamily(_name, NodeKind.BARRIER, _named(*_ops), label=_label))


def rewrites() -> dict[Any, list[Rewrite]]:
    """Every family's rewrites by target, in registration order."""
    table: dict[Any, list[Rewrite]] = {}
    for family in FAMILIES.values():
        for target, rewrite in family.rewrites.items():
            table.setdefault(target, []).append(rewrite)
    return table
