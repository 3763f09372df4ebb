"""Deploy without pickle: a merged network saved as safetensors weights plus what rebuilds
it (the model, by spec or given, its input shapes and the plan), and ONNX export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from .capture import example_inputs, input_specs, inputs_of, require_graph_module, trace
from .errors import ArgumentError
from .models.hub import load_model, runs_code
from .passes import reparameterize, transform
from .passes.base import MERGED_META, PLAN_META, REPARAMETERIZED_META
from .plan import Plan

FORMAT = "fxmerge-merged/1"


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads: its state_dict and its constants (get_attr)."""
    tensors = dict(gm.state_dict())
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in tensors:
            value = _attribute(gm, n.target)
            if isinstance(value, torch.Tensor):
                tensors[n.target] = value
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save(merged: fx.GraphModule, path: str | Path, *, model: str | None = None,
         plan: Plan | None = None) -> Path:
    """Write a merged network (from `merge` or `transform`) or a re-parameterised one (from
    `reparameterize`) to `path`: its weights as safetensors, with the plan (or the pass), the
    example inputs' shapes and, when given, the model spec (`"timm:resnet18"`, see
    `fxmerge.models.load_model`) as metadata. Nothing is pickled; `load` rebuilds the
    network from them."""
    from safetensors.torch import save_file

    require_graph_module(merged, "save")
    if REPARAMETERIZED_META in merged.meta:
        rebuild = {"pass": "reparameterize"}
    elif merged.meta.get(MERGED_META):
        plan = plan or merged.meta.get(PLAN_META)
        if plan is None:
            raise ArgumentError("save: the network carries no plan: save(merged, path, "
                                "plan=...)")
        rebuild = {"pass": "merge", "plan": plan.to_json(indent=None)}
    else:
        raise ArgumentError("save: give a merged GraphModule (fxmerge.merge or "
                            "fxmerge.transform) or a re-parameterised one "
                            "(fxmerge.reparameterize)")
    metadata = {"format": FORMAT, **rebuild,
                "inputs": json.dumps(input_specs(example_inputs(merged))), "model": model or "",
                "torch": torch.__version__}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(merged), str(path), metadata=metadata)
    return path


def load(path: str | Path, model: nn.Module | None = None, *, trust_code: bool = False
         ) -> fx.GraphModule:
    """The network `save` wrote, rebuilt in eval mode: the model (`model`, an instance of
    the same architecture, or the one its recorded spec names) is traced at the recorded
    input shapes, pruned and merged by the recorded plan (or re-parameterised), and given
    the saved weights. A recorded spec is built only from a registry (`torchvision:`,
    `timm:`, `fxmerge:`); one that names a file (`FILE.py:NAME`) would run that file, so it
    needs `model` or an explicit `trust_code=True`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever the file holds: one line)
        raise ArgumentError(f"{path}: not a safetensors file ({type(exc).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise ArgumentError(f"{path}: not a network saved by fxmerge.save (format "
                            f"{metadata.get('format')!r})")
    if model is None:
        if not metadata.get("model"):
            raise ArgumentError(f"{path} records no model spec: load(path, model=YourNet())")
        if runs_code(metadata["model"]) and not trust_code:
            raise ArgumentError(f"{path} names its model {metadata['model']!r}, a file "
                                "fxmerge would have to run: pass the model, "
                                "load(path, model=YourNet()), or trust_code=True")
        model = load_model(metadata["model"])
    gm = trace(model.eval(), inputs_of(json.loads(metadata["inputs"])))
    if metadata.get("pass", "merge") == "reparameterize":
        merged = reparameterize(gm, verify=False)
    else:
        merged = transform(gm, Plan.from_json(metadata["plan"]))
    expected = set(_tensors(merged))
    if expected != set(tensors):
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ArgumentError(f"{path} does not fit this model's merged network (unexpected "
                            f"{extra[:3]}, missing {missing[:3]}): another model?")
    with torch.no_grad():
        for name, value in tensors.items():
            target = merged.get_parameter(name) if name in dict(merged.named_parameters()) \
                else _attribute(merged, name)
            if target.shape != value.shape:
                raise ArgumentError(f"{path}: {name} has shape {tuple(value.shape)}, this "
                                    f"model's {tuple(target.shape)}: another model?")
            target.copy_(value)
    return merged.eval()


def _attribute(gm: nn.Module, name: str) -> torch.Tensor:
    value = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value


def export_onnx(merged: nn.Module, example: torch.Tensor | tuple, path: str | Path,
                opset: int = 17) -> Path:
    """The merged network as an ONNX file, exported by torch's TorchScript exporter (it
    needs no onnxscript); inputs `x0, x1, ...`, outputs `y0, ...`, the batch dynamic."""
    require_graph_module(merged, "export_onnx")
    inputs = example if isinstance(example, tuple) else (example,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"x{i}" for i in range(len(inputs))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        out = merged(*inputs)
        outs = [f"y{i}" for i in range(len(out) if isinstance(out, (tuple, list)) else 1)]
        torch.onnx.export(merged.eval(), inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=outs,
                          dynamic_axes={n: {0: "batch"} for n in names + outs})
    return path


__all__ = ["export_onnx", "load", "save"]
