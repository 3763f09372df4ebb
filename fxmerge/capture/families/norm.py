"""BatchNorm (folded into the conv before it, running statistics) and GroupNorm
(per-sample statistics: relocated, never folded); and the one refusal of a BatchNorm in
training mode, which every pass that folds one calls."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ... import algebra
from ...errors import MergeError
from .. import ops
from ..affine import AffineReader
from ..canonical import Canonicaliser, NotConstant
from ..registry import NodeKind, OpFamily, functions, register

aten = torch.ops.aten


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
    except NotConstant:
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
                  functions(NORM_FUNCTIONS, _canonical_norm), _read_norm))


# ---- GroupNorm (relocated) ----------------------------------------------------------------
def _canonical_group_norm(cz: Canonicaliser, node: fx.Node) -> bool:
    x, groups, w, b, eps = cz.arguments(node, ["input", "num_groups", "weight", "bias", "eps"],
                                        [None, None, None, None, 1e-5])
    try:
        weight, bias = cz.constant(w), cz.constant(b)
    except NotConstant:
        return False
    if weight is None and bias is None:
        return False  # without affine parameters its channels are not known here: a barrier
    norm = nn.GroupNorm(groups, (weight if weight is not None else bias).numel(), eps=eps)
    name, shared = cz.name_for(node, w, weight, "norm")
    cz.install(node, None if shared else cz.set_affine(norm, weight, bias), name, x)
    return True


register(OpFamily(
    "group_norm", NodeKind.GROUP_NORM, lambda gm, n: type(ops.module_of(gm, n)) is nn.GroupNorm,
    functions((F.group_norm, aten.group_norm.default), _canonical_group_norm)))


# ---- the refusal of batch statistics ------------------------------------------------------
def normalises_in_training(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` normalises with batch statistics (a BatchNorm module in training mode,
    a functional batch norm asked to train, or aten's functional form, which updates the
    running statistics)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    if node.op != "call_function":
        return False
    if node.target in (F.batch_norm, torch.batch_norm, aten.batch_norm.default):
        names = ["input", "running_mean", "running_var", "weight", "bias", "training"]
        if node.target is not F.batch_norm:
            names = ["input", "weight", "bias", "running_mean", "running_var", "training"]
        index = names.index("training")
        return bool(node.kwargs.get("training", node.args[index] if len(node.args) > index
                                    else False))
    return "batch_norm" in str(node.target) and "functional" in str(node.target)


def refuse_training(gm: fx.GraphModule, nodes: Iterable[fx.Node] | None = None) -> None:
    """`MergeError` naming the first of `nodes` (default: every node) that normalises in
    training mode: merging folds BatchNorm statistics, which needs eval mode."""
    for node in gm.graph.nodes if nodes is None else nodes:
        if normalises_in_training(gm, node):
            what = f"BatchNorm '{node.target}'" if node.op == "call_module" else \
                f"node '{node.name}'"
            raise MergeError(f"{what} is in training mode: call model.eval() first (merging "
                             "folds BatchNorm statistics)")
