"""Submodules of a model captured together: which ones (`select`), the inputs they receive
when the model runs (`record_inputs`, by forward hooks), and one module that calls them all
(`Bundle`), so that one graph, one merge space and one budget cover them."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves

from ..errors import ArgumentError, TraceError
from .trace import ExampleInputs, as_tuple

SubmoduleSpec = str | Iterable[str] | Callable[[str, nn.Module], bool]


def select(model: nn.Module, spec: SubmoduleSpec) -> list[str]:
    """The names of `model`'s submodules that `spec` picks: a name, several names, or a
    predicate `(name, module) -> bool` (the outermost picked where one holds another); in
    the model's module order. `ArgumentError` for a name the model lacks (with the close
    ones) or a pick of nothing."""
    modules = dict(model.named_modules())
    if callable(spec):
        picked = [name for name, m in modules.items() if name and spec(name, m)]
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
        for name in names:
            if not isinstance(name, str) or name not in modules or not name:
                close = difflib.get_close_matches(str(name), [n for n in modules if n], n=3)
                raise ArgumentError(
                    f"submodule {name!r}: {type(model).__name__} has no submodule of that name"
                    + (f" (did you mean {', '.join(close)}?)" if close else ""))
        picked = [name for name in modules if name in names]
    outer = [n for n in picked if not any(n.startswith(p + ".") for p in picked if p != n)]
    if not outer:
        raise ArgumentError(f"submodule: the predicate picks no submodule of "
                            f"{type(model).__name__}")
    return outer


def record_inputs(model: nn.Module, inputs: ExampleInputs, names: Sequence[str]
                  ) -> dict[str, tuple[torch.Tensor, ...]]:
    """What each named submodule receives when `model` runs on `inputs` in eval mode (its
    first call; positional tensors only), recorded by forward pre-hooks and removed after.
    `TraceError` for a submodule that was not called, or called with other than tensors."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple] = {}
    bad: dict[str, str] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in seen or name in bad:
                return
            if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
                bad[name] = ", ".join(type(a).__name__ for a in args) + \
                    (f", keywords {sorted(kwargs)}" if kwargs else "")
                return
            seen[name] = tuple(a.detach().clone() for a in args)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*as_tuple(inputs))
    except Exception as exc:
        raise TraceError(f"{type(model).__name__} failed on the example inputs: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in was.items():
            m.training = training
    for name in names:
        if name in bad:
            raise TraceError(f"submodule '{name}' is called with ({bad[name]}): fxmerge captures "
                             "a submodule that takes tensors only; pick the modules inside it")
        if name not in seen:
            raise TraceError(f"submodule '{name}' is never called when "
                             f"{type(model).__name__} runs on the example inputs, so its inputs "
                             "are unknown; pick submodules that run")
    return seen


def bundle_name(name: str) -> str:
    """The attribute a submodule has in a `Bundle` (dots are not allowed there)."""
    return name.replace(".", "__")


class Bundle(nn.Module):
    """The submodules `names` of a model, called one after another: `forward` takes every
    submodule's inputs, flattened in order (`arity[i]` each), and returns every output's
    tensors, flattened in order (`outputs[i]`: how to put the i-th output back together)."""

    def __init__(self, model: nn.Module, names: Sequence[str], arity: Sequence[int]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self.names, self.arity = list(names), list(arity)
        for name in names:
            self.add_module(bundle_name(name), modules[name])
        self.outputs: list[TreeSpec] = []

    def record_outputs(self, inputs: Sequence[torch.Tensor]) -> None:
        """Run each submodule on its inputs and keep the structure of its output."""
        at = 0
        with torch.no_grad():
            for name, n in zip(self.names, self.arity):
                output = getattr(self, bundle_name(name))(*inputs[at:at + n])
                leaves, spec = tree_flatten(output)
                if not all(isinstance(t, torch.Tensor) for t in leaves):
                    raise TraceError(f"submodule '{name}' returns other than tensors "
                                     f"({spec}); pick submodules whose outputs are tensors")
                self.outputs.append(spec)
                at += n

    def forward(self, *inputs: torch.Tensor) -> tuple:
        outputs, at = [], 0
        for name, n in zip(self.names, self.arity):
            outputs += tree_leaves(getattr(self, bundle_name(name))(*inputs[at:at + n]))
            at += n
        return tuple(outputs)
