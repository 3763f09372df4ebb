"""Models by name: `torchvision:NAME`, `timm:NAME`, `fxmerge:NAME` or `FILE.py:FACTORY`,
each with optional keyword arguments (`timm:resnet18:num_classes=10,drop_rate=0.1`)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, ModelSpecError

SPEC_FORMS = ("torchvision:NAME[:key=value,...]", "timm:NAME[:key=value,...]",
              "fxmerge:NAME", "path/to/file.py:FACTORY[:key=value,...]")
FXMERGE_MODELS = ("DDPMUNet", "DemoMobileNetV2")


def _refuse(spec: str, why: str) -> ModelSpecError:
    return ModelSpecError(f"model {spec!r}: {why} (accepted forms: {', '.join(SPEC_FORMS)})")


PYTHON_WORDS = {"None": None, "True": True, "False": False}  # beside JSON's null, true, false


def _keywords(spec: str, text: str) -> dict[str, Any]:
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise _refuse(spec, f"keyword {item!r} is not key=value")
        if value in PYTHON_WORDS:  # weights_backbone=None, as in Python
            kwargs[key] = PYTHON_WORDS[value]
            continue
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value  # a bare word is a string: act_layer=silu
    return kwargs


def attribute(spec: str, what: str = "model") -> Callable:
    """`FILE.py:NAME`: the object `NAME` defined in that Python file (it is run)."""
    source, _, name = spec.rpartition(":")
    path = Path(source)
    if not source or not path.is_file():
        raise ModelSpecError(f"{what} {spec!r}: no such file {source!r} (give "
                             f"FILE.py:NAME)")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ModelSpecError(f"{what} {spec!r}: {source} defines no {name!r}")
    return getattr(module, name)


def _factory(spec: str, pretrained: bool) -> tuple[Callable, dict[str, Any]]:
    source, _, rest = spec.partition(":")
    name, _, kw_text = rest.partition(":")
    if source in ("torchvision", "timm", "fxmerge") and not name:
        raise _refuse(spec, "no model name")
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
            raise _refuse(spec, f"torchvision.models has no {name!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
        factory = torchvision.models.get_model_builder(name)
        kwargs = _keywords(spec, kw_text)
        if pretrained:
            kwargs.setdefault("weights", "DEFAULT")
        elif "weights_backbone" in inspect.signature(factory).parameters:
            kwargs.setdefault("weights_backbone", None)  # random means no download at all
        return factory, kwargs
    if source == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise ModelSpecError(f"model {spec!r} needs timm: pip install 'fxmerge[zoo]'"
                                 ) from None
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise _refuse(spec, f"timm has no {name!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
        kwargs = {"pretrained": pretrained, **_keywords(spec, kw_text)}
        return (lambda **kw: timm.create_model(name, **kw)), kwargs
    if source == "fxmerge":
        if name not in FXMERGE_MODELS:
            raise _refuse(spec, f"fxmerge.models has no {name!r} (it has "
                          f"{', '.join(FXMERGE_MODELS)})")
        return getattr(importlib.import_module(__package__), name), _keywords(spec, kw_text)
    if source.endswith(".py") or Path(source).is_file():
        return attribute(f"{source}:{name}"), _keywords(spec, kw_text)
    raise _refuse(spec, f"unknown source {source!r}" if rest else "no SOURCE:NAME")


REGISTRIES = ("torchvision", "timm", "fxmerge")  # spec sources that run no file of the user's


def runs_code(spec: str) -> bool:
    """Whether building `spec` imports and runs a file (`FILE.py:NAME`), not a registry's
    model."""
    return spec.partition(":")[0] not in REGISTRIES


def load_model(spec: str, *, pretrained: bool = False) -> nn.Module:
    """The model `spec` names, with random weights unless `pretrained` (the library's own
    pretrained weights, downloaded by it). The random weights are seeded (the same spec gives
    the same network in every command), without touching the caller's random state. A spec
    that names nothing raises `ModelSpecError` listing the accepted forms; a model that
    fails to build, an `ArgumentError` saying why."""
    factory, kwargs = _factory(spec, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 (the library's or user's factory: one line)
        raise ArgumentError(f"model {spec!r} could not be built: {type(exc).__name__}: "
                            f"{exc}") from None
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model {spec!r} built a {type(model).__name__}, not an "
                            "nn.Module")
    return model
