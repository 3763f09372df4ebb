"""fxmerge inside the user's model: submodules captured together (`capture_inside`), the
pruned ones put back in a copy of the model (`prune_inside`), merged in place at the end
(`merge_model`), and a saved plan applied to a freshly built model (`apply`). The model
keeps its class, its other modules and attributes; each submodule put back is a
GraphModule that keeps the plain attributes its parent reads off it (ultralytics' `f`, `i`,
`type`, `np`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from .capture import ensure_shapes, input_specs, inputs_of, propagate_shapes, trace
from .capture.submodules import Bundle, SubmoduleSpec, bundle_name, record_inputs, select
from .capture.trace import ExampleInputs, copy_model
from .errors import ArgumentError, PlanError, TraceError
from .passes import merge as merge_graph
from .passes import prune
from .passes.base import MERGED_META, PLAN_META
from .passes.split import split
from .plan import Plan
from .space import MergeSpace


@dataclass
class Inside:
    """Submodules of a copy of the user's model captured together: the copy, the bundle
    that calls them, its inputs (every submodule's, in order) and its canonical graph."""

    model: nn.Module
    bundle: Bundle
    inputs: tuple[torch.Tensor, ...]
    gm: fx.GraphModule

    @property
    def submodules(self) -> dict[str, list[dict]]:
        """Each submodule's name with its inputs' shapes and dtypes (what `Plan` records)."""
        out, at = {}, 0
        for name, n in zip(self.bundle.names, self.bundle.arity):
            out[name] = input_specs(self.inputs[at:at + n])
            at += n
        return out


def capture_inside(model: nn.Module, inputs: ExampleInputs | None, spec: SubmoduleSpec,
                   recorded: Mapping[str, Sequence[dict]] | None = None) -> Inside:
    """A copy of `model` with the submodules `spec` picks captured together, on the inputs
    they receive when the model runs on `inputs` (or, for a saved plan, random ones of
    the shapes `recorded` names). `model` is not changed."""
    copy = copy_model(model)
    names = select(copy, spec)
    if recorded is not None:
        seen = {name: inputs_of(recorded[name]) for name in names}
    else:
        seen = record_inputs(copy, inputs, names)
    flat = tuple(t for name in names for t in seen[name])
    bundle = Bundle(copy, names, [len(seen[name]) for name in names])
    bundle.eval()
    bundle.record_outputs(flat)
    # captured at a batch of two at least: torch.export fixes any dimension of size 1
    gm = trace(bundle, tuple(torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x
                             for x in flat))
    try:  # then shapes (and the example the tables are made at) at the model's own batch
        propagate_shapes(gm, flat)
    except TraceError as exc:
        raise TraceError(f"the submodules' graph does not run at the example's batch: {exc}"
                         ) from None
    return Inside(copy, bundle, flat, gm)


def prune_inside(inside: Inside, plan: Plan, space: MergeSpace | None = None) -> nn.Module:
    """The user's model (the copy `inside` holds, copied again) with each submodule
    replaced by its part of the plan's pruned graph, to fine-tune; the plan records the
    submodules it was made for."""
    return around(inside, prune(inside.gm, plan, space))


def around(inside: Inside, gm: fx.GraphModule) -> nn.Module:
    """The user's model around a graph of `inside`'s bundle (captured, a probe's pruned
    network, or the plan's): split into its parts and put back (`put_back`)."""
    return put_back(inside, split(gm, [bundle_name(n) + "." for n in inside.bundle.names],
                                  inside.bundle.arity, inside.bundle.outputs))


class Compressed(nn.Module):
    """A submodule fxmerge compressed, where the model had it: its pruned (or merged)
    GraphModule `net`, with what rebuilds it as plain attributes, which copies and pickles
    keep (a GraphModule's metadata does not survive pickling): its name in the model, its
    inputs' shapes and dtypes, its part of the plan (JSON), and whether it is merged. It
    also keeps the plain attributes the parent read off the module it replaces
    (ultralytics' `f`, `i`, `type`, `np`)."""

    def __init__(self, net: fx.GraphModule, name: str, inputs: list[dict]) -> None:
        super().__init__()
        self.net = net
        self.submodule, self.inputs = name, inputs
        self.plan = net.meta[PLAN_META].to_json(indent=None)
        self.merged = bool(net.meta.get(MERGED_META))

    def forward(self, *args: object) -> object:
        return self.net.forward(*args)  # not through `net`'s own call: no second dispatch

    def graph_module(self) -> fx.GraphModule:
        """`net`, with its plan and shapes restored where a pickle dropped them, and its
        activations out of place again (ultralytics' loader sets every `inplace` it finds)."""
        self.net.meta.setdefault(PLAN_META, Plan.from_json(self.plan))
        for m in self.net.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        return ensure_shapes(self.net, inputs_of(self.inputs))

    def merge(self) -> Compressed:
        """This submodule merged (one conv per block, BatchNorm folded), in eval mode."""
        if self.merged:
            return self
        merged = merge_graph(self.graph_module().eval())
        _in_place_activations(merged)
        out = Compressed(merged, self.submodule, self.inputs)
        _keep_attributes(out, self)
        return out.eval()


def _in_place_activations(gm: fx.GraphModule) -> None:
    """Run in place each activation module whose input nothing else reads (computed in the
    graph, one user): a deployed network then allocates no tensor for them, as
    ultralytics' own modules do once loaded."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        module, source = gm.get_submodule(node.target), node.args[0]
        if (getattr(module, "inplace", None) is False and isinstance(source, fx.Node)
                and source.op != "placeholder" and len(source.users) == 1):
            module.inplace = True


def put_back(inside: Inside, parts: Sequence[fx.GraphModule]) -> nn.Module:
    """A copy of `inside.model` with its captured submodules replaced by `parts`, in order,
    each as a `Compressed` keeping the plain attributes of the module it replaces."""
    model = copy_model(inside.model)
    specs = inside.submodules
    for name, part in zip(inside.bundle.names, parts):
        _replace(model, name, Compressed(part, name, specs[name]))
    return model


def _keep_attributes(new: nn.Module, old: nn.Module) -> None:
    """Give `new` what a parent reads off `old` and `new` lacks: its public plain attributes
    (ultralytics' `f`, `i`, `type`, `np`), the values of its class's public properties
    where they are plain data (segmentation_models_pytorch's `encoder.output_stride`), and
    its training mode."""
    for key, value in vars(old).items():
        if not key.startswith("_") and key != "training" and key not in vars(new):
            setattr(new, key, value)
    for key in _properties(type(old)):
        if key in vars(new) or hasattr(type(new), key):
            continue
        try:
            value = getattr(old, key)
        except Exception:  # noqa: BLE001, S112 (a property that cannot be read is not kept)
            continue
        if not isinstance(value, (torch.Tensor, nn.Module)) and not callable(value):
            setattr(new, key, value)
    new.train(old.training)


def _properties(cls: type) -> set[str]:
    """The public properties `cls` and its bases define, but nn.Module's own."""
    return {key for base in cls.__mro__ if base not in (nn.Module, object)
            for key, value in vars(base).items()
            if isinstance(value, property) and not key.startswith("_")}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` is in `model`, keeping the replaced module's attributes."""
    _keep_attributes(new, model.get_submodule(name))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def compressed(model: nn.Module) -> dict[str, Compressed]:
    """The submodules of `model` that fxmerge put back, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Compressed)}


def merge_model(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every submodule fxmerge put back merged (one
    conv per block, BatchNorm folded): the user's class again, ready to deploy.
    `ArgumentError` for a model with none."""
    if not compressed(model):
        raise ArgumentError(f"merge: {type(model).__name__} holds no submodule compressed by "
                            "fxmerge (give a GraphModule, or the model compress(..., "
                            "submodule=...) returned)")
    out = copy_model(model).eval()
    for name, part in compressed(out).items():
        _replace(out, name, part.merge())
    return out


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of a freshly built `model` pruned by `plan` (made by `compress(...,
    submodule=...)`), so that its `load_state_dict` takes the weights of the network that
    was fine-tuned (how Lightning and ultralytics reload a checkpoint)."""
    if not plan.submodules:
        raise PlanError("apply: the plan names no submodules (it was made for a whole graph: "
                        "use fxmerge.transform or fxmerge.prune on the traced model)")
    missing = [n for n in plan.submodules if n not in dict(model.named_modules())]
    if missing:
        raise PlanError(f"apply: {type(model).__name__} has no submodule {missing[0]!r}, which "
                        "the plan was made for")
    inside = capture_inside(model, None, list(plan.submodules), recorded=plan.submodules)
    return prune_inside(inside, plan)


def with_submodules(plan: Plan, inside: Inside) -> Plan:
    """`plan` recording the submodules it was made for (what `apply` re-captures)."""
    return replace(plan, submodules=inside.submodules)


def merge(model: nn.Module, plan: Plan | None = None) -> nn.Module:
    """`fxmerge.merge`: a pruned GraphModule merged (`passes.merge`: one conv per block, in
    a new GraphModule), or a model holding submodules fxmerge put back merged in a copy of
    it (`merge_model`: the user's class again)."""
    if isinstance(model, Compressed):
        return model.merge()
    if not compressed(model):  # a pruned graph (anything else is refused there)
        return merge_graph(model, plan)
    return merge_model(model)
