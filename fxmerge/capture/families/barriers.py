"""The barrier families, by what they are (labels in reports): never merged through."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from ..registry import NodeKind, OpFamily, op_name, register


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
