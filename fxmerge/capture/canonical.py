"""Map every graph form onto the canonical forms of the op families (`capture.families`).

`symbolic_trace` gives `call_module` convs and norms, but traces through the zoos' own layers
(timm's `BatchNormAct2d` becomes `F.batch_norm` + `Identity` + activation). `torch.compile`
backends see `torch.conv2d` / `F.batch_norm` with weights as placeholders; `torch.export`
gives ATen ops (`aten.conv2d`, `aten.batch_norm`, `aten.relu_`, and after
`run_decompositions()` `aten.convolution`, `_native_batch_norm_legit_no_training`).

Here each conv and foldable norm whose weights are constants of the graph becomes a
`call_module` node named by the original module path; activations in any form become
activation modules (`x * sigmoid(x)` is SiLU); identities (`nn.Identity`, dropout and drop
path in eval mode, `x / 1.0`) disappear; `a + b` becomes `operator.add` where that is what it
computes. A weight that is a forward input stays an input, and its conv a barrier. Each
rewrite is its family's (`registry.OpFamily.rewrites`); this module runs them and offers
them the graph's constants and names.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import TraceError
from . import ops, registry

_SHAPE_READS = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                operator.ge, operator.and_, len, "size", "dim"}
_TRACER_VALUES = ("example_value", "val", "tensor_dict", "grapharg")


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


def _owner(node: Any) -> str | None:
    """The module whose attributes a computed weight is made of: the common prefix of the
    attributes it reads (`stem.conv` for `stem.conv.weight` and `stem.conv.gain`)."""
    if not isinstance(node, fx.Node):
        return None
    paths = [n.target.rpartition(".")[0] for n in ops.ancestors(node) if n.op == "get_attr"]
    if not paths or any(not p for p in paths):
        return None
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) or None


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


class NotConstant(Exception):
    """A rewrite's argument is not a constant of the graph: the node is not that family's
    to rewrite (private to capture; a user's own error in a weight computation is not
    caught as this)."""


class Canonicaliser:
    """Rewrites one graph in place; the families' rewrites use its helpers."""

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
        if isinstance(arg, fx.Node) and arg.op in ("call_function", "call_method"):
            return self.computed(arg)
        raise NotConstant(f"{arg} is not a constant of the graph")

    def computed(self, node: fx.Node) -> torch.Tensor:
        """The value of `node` when it is computed from constants of the graph alone (a
        weight standardised or normalised from parameters: weight norm, timm's
        `ScaledStdConv2d`, `F.conv2d(x, f(self.w))`), evaluated once; `NotConstant` when
        anything it reads is a forward input or a module call, `TraceError` when the
        computation itself fails."""
        order = [n for n in self.gm.graph.nodes if n is node or n in ops.ancestors(node)]
        env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for n in order:
                if n.op in ("get_attr", "placeholder"):
                    env[n] = self.constant(n)
                elif n.op in ("call_function", "call_method"):
                    args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                    try:
                        env[n] = (n.target(*args, **kwargs) if n.op == "call_function"
                                  else getattr(args[0], n.target)(*args[1:], **kwargs))
                    except Exception as exc:
                        raise TraceError(f"node {n.name!r}: computing the weight {node.name!r} "
                                         f"from the model's constants failed ({type(exc).__name__}"
                                         f": {exc})") from exc
                else:
                    raise NotConstant(f"{node} reads {n}, not a constant of the graph")
        value = env[node]
        if not isinstance(value, torch.Tensor):
            raise NotConstant(f"{node} is not a tensor")
        return value.detach()

    def weight_parametrization(self, arg: Any, value: torch.Tensor
                               ) -> tuple[nn.Parameter, fx.GraphModule] | None:
        """`(raw, fn)` for a weight computed from module attributes alone, one of them the
        raw weight (the one parameter of `value`'s shape), where `fn(raw)` computes `value`
        (the weight, as `constant` gave it) exactly, holding the other attributes it reads
        (a gain, a scale) as its own. A conv given it as a parametrization trains what the
        model trained. None for any other weight."""
        if not isinstance(arg, fx.Node) or arg.op not in ("call_function", "call_method"):
            return None
        inputs = ops.ancestors(arg)
        nodes = [n for n in self.gm.graph.nodes if n is arg or n in inputs]
        if any(n.op not in ("get_attr", "call_function", "call_method") for n in nodes):
            return None
        leaves = {n: self.constant(n) for n in nodes if n.op == "get_attr"}
        raws = [n for n, v in leaves.items()
                if isinstance(v, nn.Parameter) and v.shape == value.shape]
        if len(raws) != 1 or not all(isinstance(v, torch.Tensor) for v in leaves.values()):
            return None
        root, graph = nn.Module(), fx.Graph()
        env = {raws[0]: graph.placeholder("weight")}
        for n in nodes:
            if n in env:
                continue
            if n.op == "get_attr":
                name = n.target.rpartition(".")[2]  # `gain`, or the whole path if taken
                name = n.target.replace(".", "_") if hasattr(root, name) else name
                if isinstance(leaves[n], nn.Parameter):
                    root.register_parameter(name, leaves[n])
                else:
                    root.register_buffer(name, leaves[n])
                env[n] = graph.get_attr(name)
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(env[arg])
        raw, fn = leaves[raws[0]], fx.GraphModule(root, graph)
        with torch.no_grad():
            return (raw, fn) if torch.equal(fn(raw), value) else None

    def erase_unused(self, arg: Any) -> None:
        """Erase `arg` and what it was computed from, where nothing else reads them (a
        weight's computation, once the weight is folded into a module)."""
        if not isinstance(arg, fx.Node) or arg.op == "placeholder":
            return
        inputs = ops.ancestors(arg)
        nodes = [n for n in self.gm.graph.nodes if n is arg or n in inputs]
        for n in reversed(nodes):
            if not n.users and n.op != "placeholder":
                self.gm.graph.erase_node(n)

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
                path = module_path(node) or _owner(weight_arg)
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
                    if not hasattr(module, child_name):  # (its own parametrizations win)
                        module.add_module(child_name, child)
            except AttributeError:
                pass
            self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def install_activation(self, node: fx.Node, module: nn.Module, x: fx.Node) -> None:
        name, _ = self.name_for(node, None, None, "act")
        self.install(node, module, name, x)

    @staticmethod
    def arguments(node: fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
        """`node`'s arguments by name, positional or keyword, with defaults."""
        values = dict(zip(names, defaults))
        values.update(zip(names, node.args))
        values.update(node.kwargs)
        return [values[n] for n in names]

    @staticmethod
    def parameter(t: torch.Tensor) -> nn.Parameter:
        return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)

    def set_affine(self, norm: nn.Module, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> nn.Module:
        """Give a norm the graph's affine parameters: a missing weight is 1, a missing bias
        0 (weight None is not `affine=False` when a bias is given)."""
        if weight is not None or bias is not None:
            norm.weight = self.parameter(weight if weight is not None else torch.ones_like(bias))
            norm.bias = self.parameter(bias if bias is not None else torch.zeros_like(weight))
        return norm

    def run(self) -> fx.GraphModule:
        """Rewrite every node into its family's canonical form (`families`)."""
        table = registry.rewrites()
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module":
                target = type(self.gm.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                target = node.target
            else:
                continue
            key_ok = (node.op == "call_method") == isinstance(target, str)
            candidates = table.get(registry.ANY, []) + (table.get(target, []) if key_ok else [])
            for rewrite in candidates:
                if rewrite(self, node):
                    break
        for node in reversed(list(self.gm.graph.nodes)):
            if not node.users and (node.op == "get_attr" or node.target in _SHAPE_READS
                                   or node.target == _EXPORT_GUARDS):
                self.gm.graph.erase_node(node)
            for key in _TRACER_VALUES:  # fake tensors of the tracer's mode; shapes are redone
                node.meta.pop(key, None)
        if hasattr(self.gm, _EXPORT_GUARDS):  # a local function: the graph would not pickle
            delattr(self.gm, _EXPORT_GUARDS)
        # unpickling re-traces the code with the tracer that made the graph; export's needs
        # arguments it is not given there, fx's own does not
        self.gm._tracer_cls, self.gm._tracer_extras = None, {}
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


# torch.export's check of the input shapes, a module holding a local function: dropped, so
# that the graph pickles (a timing worker gets it); shapes are checked by each op anyway
_EXPORT_GUARDS = "_guards_fn"


def canonicalize(gm: fx.GraphModule, inputs: Sequence[Any] = ()) -> fx.GraphModule:
    """`gm` in canonical form, changed in place (pass a copy). `inputs` are the values of its
    placeholders (a dynamo backend's `example_inputs`): those dynamo lifted from the module's
    parameters become constants; forward inputs stay inputs."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = {name: t for name, t in zip(placeholders, inputs) if isinstance(t, torch.Tensor)}
    return Canonicaliser(gm, values).run()
