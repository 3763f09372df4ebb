"""The `fxmerge` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import FxMergeError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def load_model(spec: str) -> torch.nn.Module:
    """`torchvision:NAME[:key=value,...]` or `path/to/file.py:factory`."""
    source, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"model spec {spec!r} needs the form SOURCE:NAME")
    if source == "torchvision":
        import torchvision

        name, _, kwargs_text = rest.partition(":")
        kwargs = {}
        for item in filter(None, kwargs_text.split(",")):
            key, _, value = item.partition("=")
            kwargs[key] = json.loads(value)
        factory = getattr(torchvision.models, name, None)
        if factory is None:
            raise ValueError(f"torchvision.models has no {name!r}")
        return factory(**kwargs)
    if source == "fxmerge":
        from . import models

        return getattr(models, rest)()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"no such model file: {source}")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, rest, None)
    if factory is None:
        raise ValueError(f"{source} defines no {rest!r}")
    return factory()


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME[:k=v,...] or path/to/file.py:factory")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224),
                   help="example input shape, comma separated (default 1,3,224,224)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="CONV",
                   help="module names of convs kept out of the search")
    p.add_argument("--stride-rule", choices=["paper", "exact"], default="paper")


def _space(args: argparse.Namespace):
    from .space import analyze
    from .trace import trace

    model = load_model(args.model).eval()
    gm = trace(model, torch.randn(*args.input_shape))
    return gm, analyze(gm, stride_rule=args.stride_rule, exclude=args.exclude)


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    _, space = _space(args)
    print(space.summary())
    _write(args.out, json.dumps({
        "signature": space.signature,
        "num_blocks": space.num_blocks,
        "num_entries": space.num_entries,
        "convs": [c.name for c in space.convs],
        "entries": [list(e) for e in space.entries],
    }, indent=1))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxmerge", description="LayerMerge depth compression for CNNs (torch.fx).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="print a model's merge space")
    _add_model_args(p)
    p.add_argument("--out", help="write the space (entries, convs) as JSON")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FxMergeError, ValueError, FileNotFoundError) as exc:
        print(f"fxmerge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
