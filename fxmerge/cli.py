"""The `fxmerge` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from dataclasses import replace
from enum import Enum
from pathlib import Path

import torch

from .capture.ops import CONVS
from .errors import ArgumentError, FxMergeError, ModelSpecError
from .job import Job
from .models.hub import attribute, load_model
from .pipeline import (
    AnalysisSettings,
    ImportanceMode,
    ImportanceStageSettings,
    JobSettings,
    LatencyStageSettings,
    SolveStageSettings,
    summary_line,
)
from .plan import Plan
from .solve import importance_keys

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2  # argparse also exits with 2 on bad usage


def load_tensors(path: str | Path, what: str = "--weights") -> dict:
    """A file of tensors (torch.save of a state_dict), loaded without running any pickled
    code: anything else is refused."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever the file holds, one line)
        raise ArgumentError(f"{what} {path}: not a file of tensors that can be loaded safely "
                         f"({type(exc).__name__}); fxmerge never unpickles code") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{what} {path}: expected a state_dict, got {type(data).__name__}")
    return data


def _load_state(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    try:
        module.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 (missing keys, shapes, dtypes: one line)
        first = str(exc).strip().splitlines()
        raise ArgumentError(f"--weights {path} does not fit the model: "
                         f"{' '.join(first[:2])[:300]}") from None


def _input_spec(text: str) -> tuple[tuple[int, ...], int | None]:
    """`2,3,32,32` (a float input) or `2:int:1000` (integers in [0, 1000), e.g. timesteps)."""
    shape, _, rest = text.partition(":")
    try:
        dims = tuple(int(v) for v in shape.split(","))
        kind, _, high = rest.partition(":")
        if rest and (kind != "int" or int(high) < 1):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SHAPE (2,3,32,32) or SHAPE:int:HIGH (2:int:1000)") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return dims, int(high) if rest else None


def example_batch(args: argparse.Namespace, batch: int | None = None,
                  side: int | None = None) -> tuple:
    """The example inputs `--input-shape` describes (seeded), with the batch set to `batch`
    and the spatial sides of float inputs (batch, channels, *sides) cut to `side`."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for dims, high in args.input_shape or [((1, 3, 224, 224), None)]:
        dims = (batch, *dims[1:]) if batch is not None else dims
        if side is not None and high is None and len(dims) >= 3:
            dims = (*dims[:2], *(min(d, side) for d in dims[2:]))
        inputs.append(torch.randn(dims, generator=gen) if high is None
                      else torch.randint(high, dims, generator=gen))
    return tuple(inputs)


def add_settings(p: argparse.ArgumentParser, settings: type) -> None:
    """An option `--NAME` for every field of a settings dataclass, from its one default,
    help string and choices (the field's metadata)."""
    types = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        required = f.default is dataclasses.MISSING
        shown = f.default.value if isinstance(f.default, Enum) else f.default
        help_text = meta["help"] + ("" if required or f.default in (None, ())
                                    else f" (default: {shown})")
        if types[f.name] is bool:
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = next((t for t in typing.get_args(types[f.name]) if t is not type(None)),
                    types[f.name])
        choices = meta.get("choices")
        extra = {"nargs": meta["nargs"]} if "nargs" in meta else {}
        p.add_argument(flag, type=str if choices or extra else kind, required=required,
                       default=None if required else f.default, help=help_text,
                       choices=[str(c) for c in choices] if choices else None,
                       metavar=meta.get("metavar"), **extra)


def settings_from(args: argparse.Namespace, settings: type) -> object:
    """The settings dataclass the options of `add_settings` were given for."""
    return settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings)})


def _add_model_args(p: argparse.ArgumentParser, pruned_weights: bool = False,
                    analysis: bool = True) -> None:
    """The model and its inputs; `analysis`: every `AnalysisSettings` option, else
    `--exclude` alone (a pass without a search; a plan's own settings)."""
    p.add_argument("model", help="torchvision:NAME[:k=v,...], timm:NAME[:k=v,...], "
                   "fxmerge:NAME (built-in nets) or path/to/file.py:FACTORY; random weights "
                   "unless --weights")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or progress lines on stderr")
    p.add_argument("--input-shape", type=_input_spec, action="append", metavar="SHAPE",
                   help="example input shape, comma separated (default 1,3,224,224); give "
                   "it once per forward argument; SHAPE:int:HIGH for integers in [0, HIGH), "
                   "e.g. --input-shape 1,3,32,32 --input-shape 1:int:1000 for (x, t)")
    if pruned_weights:
        p.add_argument("--weights", required=True, help="the fine-tuned pruned state_dict "
                       "(from transform --pruned-out; tensors only)")
    else:
        p.add_argument("--weights", help="a state_dict file (tensors only) to load, or "
                       "'pretrained' for the library's own weights (downloaded)")
    if analysis:
        add_settings(p, AnalysisSettings)
    else:  # the one analysis option a pass without a search takes
        field = next(f for f in dataclasses.fields(AnalysisSettings) if f.name == "exclude")
        p.add_argument("--exclude", nargs="*", default=(), metavar="CONV",
                       help=field.metadata["help"])


def _job(args: argparse.Namespace, analysis: dict | None = None, **options) -> Job:
    """The command's `Job`: the model `args` names, its example inputs, the analysis its
    options (or a plan's, `analysis`) give, and `options` (latency, timing, tables...)."""
    if analysis is None:
        analysis = settings_from(args, AnalysisSettings).options() if hasattr(
            args, "stride_rule") else {"exclude": tuple(args.exclude)}
    return Job(_model(args).eval(), example_batch(args), analysis=analysis,
               progress=_progress(args), **options)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    """The model `args.model` names, with `--weights` (a state_dict, or "pretrained"), which
    are the pruned network's for `merge`."""
    weights = args.weights if args.command != "merge" else None
    model = load_model(args.model, pretrained=weights == "pretrained")
    if weights and weights != "pretrained":
        _load_state(model, load_tensors(weights), weights)
    return model


def _progress(args: argparse.Namespace) -> bool | None:
    """Progress as the command line asks: None (shown) unless --quiet."""
    return False if getattr(args, "quiet", False) else None


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)


def _save(path: str | None, obj: object) -> None:
    """torch.save `obj` when a path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        print(f"wrote {path}", file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .space import reach

    space = _job(args).space
    print(space.summary())
    _write(args.out, json.dumps({
        "signature": space.signature,
        "num_blocks": space.num_blocks,
        "num_entries": space.num_entries,
        "convs": [c.name for c in space.convs],
        "entries": [list(e) for e in space.entries],
        "capture": space.capture,
        "reach": reach(space),
    }, indent=1))
    return EXIT_OK


def cmd_latency(args: argparse.Namespace) -> int:
    settings = settings_from(args, LatencyStageSettings)
    job = _job(args, latency=settings.options())
    table, space = job.latency, job.space
    s = table.settings
    print(f"{s.num_entries} entries from {s.num_layers} distinct convs, "
          f"{s.backend} on {s.device} ({s.machine}), batch {s.batch_size}, {s.threads} "
          "threads: "
          f"original table latency {table.identity_latency(space):.4g} ms")
    _write(args.out, table.to_json())
    return EXIT_OK


def cmd_importance(args: argparse.Namespace) -> int:
    from .tables.base import key_name

    settings = settings_from(args, ImportanceStageSettings)
    settings.check()
    job = _job(args)
    keys = importance_keys(job.space)
    if settings.evaluate:
        finetune = attribute(settings.finetune, "--finetune") if settings.finetune else None
        table = job.importance(keys, evaluate=attribute(settings.evaluate, "--evaluate"),
                               finetune=finetune, cache=settings.cache)
    else:
        batch = example_batch(args, settings.calibration_batch, settings.calibration_size)
        try:
            with torch.no_grad():
                job.gm.eval()
                job.gm(*batch)
        except Exception:  # noqa: BLE001  (a graph traced for one size only)
            print(f"the model does not run at {settings.calibration_size} pixels a side: "
                  "calibrating at the example input's size")
            batch = example_batch(args, settings.calibration_batch)
        table = job.importance(keys, batch=batch)
    low = sorted(table.values.items(), key=lambda kv: kv[1])[:5]
    print(f"{len(table)} importance values ({table.settings.estimator}); lowest: "
          + ", ".join(f"{key_name(k)}={v:.3g}" for k, v in low))
    _write(args.out, table.to_json())
    return EXIT_OK


def cmd_solve(args: argparse.Namespace) -> int:
    from .solve import frontier
    from .tables import ImportanceTable, LatencyTable

    settings = settings_from(args, SolveStageSettings)
    settings.check()
    latency = LatencyTable.from_json(Path(settings.latency).read_text())
    importance = ImportanceTable.from_json(Path(settings.importance).read_text())
    job = _job(args, latency=latency, importance=importance, threads=settings.threads,
               timing={"repeat": settings.timing_repeat, "allocator": settings.allocator})
    latency.check(job.space)
    original = latency.identity_latency(job.space)
    floor = job.reach(settings.method)
    print(f"reach: the fastest {settings.method} plan's table latency is "
          f"{floor * original:.4g} ms, {floor:.1%} of the original's {original:.4g} ms")
    plan = job.solve(importance, settings.budget, method=settings.method,
                     basis=settings.budget_basis, budget_ms=settings.budget_ms,
                     levels=settings.levels, save_to=args.out)
    print(plan.describe())
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    if settings.frontier or settings.plot:
        front = frontier(job.space, latency, importance, method=settings.method,
                         levels=settings.levels or 1000)
        _write(settings.frontier, front.to_json())
        if settings.plot:
            print(f"wrote {front.plot(settings.plot)}", file=sys.stderr)
    return EXIT_OK


def _plan_job(args: argparse.Namespace) -> tuple[Job, Plan]:
    """The plan `--plan` holds, and the job over the model analysed with the plan's own
    settings."""
    plan = Plan.from_json(Path(args.plan).read_text())
    if args.exclude and tuple(sorted(args.exclude)) != tuple(sorted(plan.exclude)):
        raise ArgumentError(f"--exclude {' '.join(args.exclude)}: the plan was solved with "
                            f"--exclude {' '.join(plan.exclude) or '(none)'}; the plan's own "
                            "analysis settings apply (leave --exclude out)")
    return _job(args, plan=plan), plan


def cmd_transform(args: argparse.Namespace) -> int:
    from .passes import diff

    job, plan = _plan_job(args)
    pruned = job.prune(plan)
    merged = job.merge(pruned)
    print(diff(job.gm, merged))
    _save(args.pruned_out, pruned.state_dict())
    _deploy(args, merged)
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    job, plan = _plan_job(args)
    pruned = job.prune(plan)  # deterministic
    _load_state(pruned, load_tensors(args.weights), args.weights)
    merged = job.merge(pruned)
    n_convs = sum(isinstance(m, CONVS) for m in merged.modules())
    print(f"merged {len(plan.blocks)} blocks: {n_convs} convs, "
          f"{len(merged.graph.nodes)} nodes (pruned had {len(pruned.graph.nodes)})")
    _deploy(args, merged)
    return EXIT_OK


def cmd_reparameterize(args: argparse.Namespace) -> int:
    from .passes import diff, reparameterize

    gm = _job(args).gm
    collapsed = reparameterize(gm, exclude=args.exclude)
    print(diff(gm, collapsed))
    n_convs = sum(isinstance(m, CONVS) for m in collapsed.modules())
    print(f"collapsed {collapsed.meta['fxmerge_reparameterized']} regions of parallel "
          f"branches: {n_convs} convs (the model had "
          f"{sum(isinstance(m, CONVS) for m in gm.modules())})")
    _deploy(args, collapsed)
    return EXIT_OK


def cmd_compress(args: argparse.Namespace) -> int:
    from .pipeline import (
        image_folder,
        is_segmentation_folder,
        is_unlabeled_folder,
        run_job,
        segmentation_folder,
        unlabeled_folder,
    )

    if args.input_shape:
        raise ArgumentError("compress takes its input shape from the images (--size)")
    settings = settings_from(args, JobSettings)
    settings.check()
    if args.model.startswith("ultralytics:"):  # a YOLO and its data.yaml
        from .yolo import detection_summary, run_yolo_job

        report = run_yolo_job(args.model.removeprefix("ultralytics:"), args.data, args.out,
                              settings, progress=_progress(args))
        print(detection_summary(report, Path(args.out)))
        return EXIT_OK
    if is_segmentation_folder(args.data):
        data = segmentation_folder(args.data, settings)
    elif is_unlabeled_folder(args.data):
        data = unlabeled_folder(args.data, settings)
    else:
        data = image_folder(args.data, settings)
    report = run_job(_model(args), data, args.out, settings, spec=args.model,
                     analyze_options=settings_from(args, AnalysisSettings).options(),
                     progress=_progress(args))
    print(summary_line(report, Path(args.out)))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .capture import example_inputs
    from .deploy import export_onnx, load

    net = load(args.network, model=load_model(args.model) if args.model else None)
    export_onnx(net, example_inputs(net), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def _deploy(args: argparse.Namespace, merged: torch.fx.GraphModule) -> None:
    """Write the merged network to --out: ONNX for a .onnx path, else `fxmerge.save`
    (safetensors weights and what rebuilds them; `fxmerge.load` reads it)."""
    from .deploy import export_onnx, save

    if not args.out:
        return
    if Path(args.out).suffix == ".onnx":
        export_onnx(merged, example_batch(args), args.out)
    else:
        save(merged, args.out, model=args.model)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if args.seeds < 1:
        raise ArgumentError(f"--seeds must be at least 1, got {args.seeds}")
    if args.task == "compress":  # `fxmerge compress` itself, on the digits as a folder
        from .demos.compress import run_compress_demo

        if args.seeds != 1 or args.distorted:
            raise ArgumentError("--seeds and --distorted are for the classify task")
        out = out or Path("fxmerge-compress-demo")
        report = run_compress_demo(out, quick=args.quick)
        print(summary_line(report, out / "job"))
        return EXIT_OK
    if args.task in ("detect", "segment"):
        from .demos.tasks import run_detect_demo, run_segment_demo

        if args.seeds != 1 or args.distorted:
            raise ArgumentError("--seeds and --distorted are for the classify task")
        out = out or Path(f"fxmerge-{args.task}-demo")
        if args.task == "detect":
            from .yolo import detection_summary

            report = run_detect_demo(out, quick=args.quick)
            print(detection_summary(report, out / "job"))
        else:
            report = run_segment_demo(out, quick=args.quick)
            print(summary_line(report, out / "job"))
        return EXIT_OK
    if args.task == "ddpm":
        from .demos.ddpm import DDPMDemoConfig, run_ddpm_demo

        if args.seeds != 1 or args.distorted:
            raise ArgumentError("--seeds and --distorted are for the classify task")
        run_ddpm_demo(out, DDPMDemoConfig.quick() if args.quick else DDPMDemoConfig())
    else:
        from .demos.classify import DemoConfig, run_demo

        if args.quick:
            config = replace(DemoConfig.quick(), distorted=args.distorted)
        else:
            config = DemoConfig.distorted_task() if args.distorted else DemoConfig()
        config = replace(config, importance=ImportanceMode(args.importance))
        run_demo(out, config, seeds=args.seeds)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxmerge", description="LayerMerge depth compression for CNNs (torch.fx).",
        epilog="exit codes: 0 success, 1 error (the message says which rule), 2 bad usage")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="print a model's merge space")
    _add_model_args(p)
    p.add_argument("--out", help="write the space (entries, convs) as JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("latency", help="measure the latency table")
    _add_model_args(p)
    p.add_argument("--out", help="write the table as JSON")
    add_settings(p, LatencyStageSettings)
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("importance", help="estimate the importance table")
    _add_model_args(p)
    p.add_argument("--out", help="write the table as JSON")
    add_settings(p, ImportanceStageSettings)
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("solve", help="pick the best plan under a latency budget")
    _add_model_args(p)
    add_settings(p, SolveStageSettings)
    p.add_argument("--out", help="write the plan as JSON")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("transform", help="apply a plan: prune and merge, print the diff")
    _add_model_args(p, analysis=False)
    p.add_argument("--plan", required=True, help="plan JSON from `fxmerge solve`")
    p.add_argument("--out", help="write the merged network: NAME.onnx for ONNX, else "
                   "safetensors weights that fxmerge.load rebuilds it from (no pickle)")
    p.add_argument("--pruned-out", help="save the pruned network's state_dict (tensors only) "
                   "to fine-tune; rebuild it with fxmerge.prune(fxmerge.trace(model, x), plan)")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("merge", help="merge fine-tuned pruned weights (from transform "
                       "--pruned-out) into one conv per block")
    _add_model_args(p, pruned_weights=True, analysis=False)
    p.add_argument("--plan", required=True, help="the plan JSON it was pruned with")
    p.add_argument("--out", help="write the merged network: NAME.onnx for ONNX, else "
                   "safetensors weights that fxmerge.load rebuilds it from (no pickle)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("reparameterize", help="collapse every region of parallel linear "
                       "branches (RepVGG, MobileOne, ACNet blocks) into one conv")
    _add_model_args(p, analysis=False)
    p.add_argument("--out", help="write the network: NAME.onnx for ONNX, else safetensors "
                   "weights that fxmerge.load rebuilds it from (no pickle)")
    p.set_defaults(func=cmd_reparameterize)

    p = sub.add_parser("compress", help="the whole job on your image folder: latency "
                       "table, importance, measured solve, fine-tune with distillation, merge, "
                       "export, report.md")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="an image folder: DIR/train/CLASS/*.png and "
                   "DIR/val/CLASS/*.png; a segmentation folder: DIR/{train,val}/images/*.png "
                   "and DIR/{train,val}/masks/*.png (scored by mean IoU); unlabeled images: "
                   "DIR/{train,val}/*.png (fine-tuned by distillation, scored by output "
                   "agreement with the original); for MODEL "
                   "ultralytics:WEIGHTS.pt (or a model .yaml), a detection data.yaml")
    p.add_argument("--out", required=True, help="folder for every stage's result and "
                   "report.md; a job run again with it resumes")
    add_settings(p, JobSettings)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="export a merged network saved by transform/merge "
                       "--out (or fxmerge.save) to ONNX")
    p.add_argument("network", help="the saved network (.safetensors)")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--model", help="model spec, where the file records none (it was saved "
                   "from Python without one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="end-to-end compression on bundled or synthetic data")
    p.add_argument("--task", choices=["classify", "ddpm", "compress", "detect", "segment"],
                   default="classify",
                   help="classify: methods and budgets compared on a MobileNetV2-style "
                   "classifier (default); ddpm: a diffusion U-Net, scored by held-out loss "
                   "and a Frechet distance; compress: `fxmerge compress` on the digits "
                   "written as an image folder; detect: a YOLOv8n (ultralytics) on "
                   "synthetic shapes, in ultralytics' own trainer; segment: a U-Net "
                   "(ResNet-18 encoder) on synthetic shapes and masks")
    p.add_argument("--out", help="folder for results.json, the tables and the plots")
    p.add_argument("--seeds", type=int, default=1, help="repeat the whole job over N seeds "
                   "(split, training, fine-tuning) and report mean ± std (classify)")
    p.add_argument("--distorted", action="store_true", help="the harder task: digits "
                   "rotated, scaled, shifted and noisy (classify)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--importance", choices=[str(m) for m in ImportanceMode], default="proxy",
                   help="proxy: output agreement, seconds; finetune: the paper's estimator, "
                   "a brief fine-tune per entry (classify; default: proxy)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FxMergeError, OSError) as exc:  # a bug elsewhere shows its traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or message}"
        print(f"fxmerge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ModelSpecError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
