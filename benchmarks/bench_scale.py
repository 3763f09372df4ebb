"""What each fxmerge stage costs as networks grow: time and peak resident memory of trace,
analyze, latency table, output-agreement importance, solve and transform, each stage alone.

    python benchmarks/bench_scale.py [--only resnet50 ...] [--size 224] [--keys 32]
    python benchmarks/bench_scale.py --proxy [--only resnet152 resnet50 mobilenet_v2]

`--proxy` times the whole output-agreement table as a user gets it, `fxmerge importance
torchvision:NAME` with its default calibration (wall clock of the command), and for the
networks with a reference (ResNet-50, MobileNetV2) ranks it against the table from the
earlier default calibration (8 random images at 224x224): Spearman over every key and over
the multi-conv entries alone.

Each network runs in a fresh process (random weights, batch 1, CPU, eager). A stage's peak is
the process's resident high-water mark during that stage alone (reset before it through
/proc/self/clear_refs); `inference` is the same for one forward of the model, the reference
for the transform's memory. The importance proxy is timed on a seeded sample of `--keys` keys
(about one partial forward each) and on its first key alone; the difference gives the cost
per key, from which the whole table's time is projected; `transform` is timed and its peak
taken on a random plan right after analysis (while only the model and its graph are
resident, so that earlier stages' freed memory does not count), and the solved plan's
transform is timed again at the end; `solve` runs
on a complete table of seeded random importances, at the budget halfway between the
original's table latency and the fastest plan's. The merged
network is checked against the pruned one (max-abs error relative to the output's size), and
so are the identity plan's (against the model) and a random plan's (against its pruned one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from common import RESULTS, write

import fxmerge
from fxmerge import depth_keys, fastest_latency

SEGMENTATION = torchvision.models.segmentation


def _unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None)


NETWORKS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "convnext_base": lambda: torchvision.models.convnext_base(),
    "lraspp_mobilenet_v3_large": lambda: SEGMENTATION.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None),
    "deeplabv3_mobilenet_v3_large": lambda: SEGMENTATION.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=False),
    "smp_unet_resnet34": _unet,
    "fcn_resnet50": lambda: SEGMENTATION.fcn_resnet50(weights=None, weights_backbone=None,
                                                      aux_loss=False),
    "efficientnet_b4": lambda: torchvision.models.efficientnet_b4(),
    "densenet201": lambda: torchvision.models.densenet201(),
    "resnet152": lambda: torchvision.models.resnet152(),
}
STAGES = ["trace", "analyze", "latency", "importance", "solve", "transform"]


def _status(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Stage:
    """Times a stage and records its own resident peak (high-water mark reset first)."""

    def __init__(self, row: dict, name: str) -> None:
        self.row, self.name = row, name

    def __enter__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.row[f"{self.name}_s"] = round(time.perf_counter() - self.start, 3)
        self.row[f"{self.name}_peak_mb"] = round(_status("VmHWM"))


def child(name: str, size: int, keys: int) -> dict:
    torch.manual_seed(0)
    model = NETWORKS[name]().eval()
    x = torch.randn(1, 3, size, size)
    row = {"network": name, "convs": sum(isinstance(m, torch.nn.Conv2d)
                                         for m in model.modules()),
           "load_before": round(os.getloadavg()[0], 2)}
    with Stage(row, "inference"), torch.no_grad():
        model(x)
    with Stage(row, "trace"):
        gm = fxmerge.trace(model, x)
    with Stage(row, "analyze"):
        space = fxmerge.analyze(gm)
    row.update(searched=space.L, blocks=space.num_blocks, entries=space.num_entries)
    random_plan = fxmerge.Plan.random(space, 0)
    with Stage(row, "transform"):  # here, while only the model and its graph are resident
        merged = fxmerge.transform(gm, random_plan, space)
    row["random_error"] = _error(fxmerge.prune(gm, random_plan, space).eval(), merged, x)
    row["transform_vs_inference"] = round(row["transform_peak_mb"]
                                          / row["inference_peak_mb"], 2)
    del merged
    with Stage(row, "latency"):
        latency = fxmerge.measure_latency(space, gm)
    row["timed_convs"] = latency.settings.num_layers
    row["table_check"] = latency.settings.check
    all_keys = _all_keys(space)
    sample = random.Random(0).sample(all_keys, min(keys, len(all_keys)))
    start = time.perf_counter()  # the setup (one whole forward, the jobs) and one key
    fxmerge.agreement_importance(space, gm, x, keys=sample[:1])
    one = time.perf_counter() - start
    with Stage(row, "importance"):
        fxmerge.agreement_importance(space, gm, x, keys=sample)
    per_key = (row["importance_s"] - one) / max(len(sample) - 1, 1)
    row.update(keys=len(all_keys), keys_timed=len(sample),
               importance_ms_per_key=round(per_key * 1e3, 1),
               importance_projected_s=round(one + per_key * (len(all_keys) - 1), 1))
    rng = random.Random(1)
    importance = fxmerge.ImportanceTable.from_values(
        space, {k: rng.uniform(0.5, 1.0) for k in all_keys}, keys=all_keys)
    reach = fastest_latency(space, latency, importance) / latency.identity_latency(space)
    row["budget"] = round((1 + reach) / 2, 3)  # halfway between the original and the fastest
    with Stage(row, "solve"):
        plan = fxmerge.solve(space, latency, importance, budget=row["budget"])
    start = time.perf_counter()
    merged = fxmerge.transform(gm, plan, space)
    row["transform_solved_s"] = round(time.perf_counter() - start, 3)
    row["error"] = _error(fxmerge.prune(gm, plan, space).eval(), merged, x)
    row["identity_error"] = _error(model, fxmerge.transform(gm, fxmerge.Plan.identity(space)), x)
    row["merged_convs"] = sum(isinstance(m, torch.nn.Conv2d) for m in merged.modules())
    row["load_after"] = round(os.getloadavg()[0], 2)
    return row


def _error(reference: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor) -> float:
    """Max-abs difference of the first outputs, relative to the reference's largest value."""
    with torch.no_grad():
        want, got = (torch.utils._pytree.tree_leaves(net(x))[0] for net in (reference, other))
    return float((want - got).abs().max() / want.abs().max())


def _all_keys(space: fxmerge.MergeSpace) -> list:
    """Every key the default importance table holds (entries, Depth's keys, LayerOnly's)."""
    return [*space.entries, *depth_keys(space),
            *(c.name for c in space.convs if not c.irreducible)]


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, marker in (("latency", "o"), ("importance_projected", "s"), ("trace", "^"),
                          ("analyze", "v"), ("transform", "D"), ("solve", "x")):
        pts = sorted((r["entries"], r[f"{stage}_s"]) for r in rows if f"{stage}_s" in r)
        ax.plot(*zip(*pts), marker=marker, label=stage.replace("_", " "))
    ax.set(xscale="log", yscale="log", xlabel="entries in the space", ylabel="seconds",
           title="fxmerge stage time against entries (CPU, 224x224, batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=110)


REFERENCE = ["--calibration-batch", "8", "--calibration-size", "224"]  # the earlier default


def _importance(name: str, out: Path, *extra: str) -> float:
    """Seconds `fxmerge importance torchvision:NAME` takes, its table written to `out`."""
    start = time.perf_counter()
    subprocess.run(["fxmerge", "importance", f"torchvision:{name}", "--out", str(out),
                    "--quiet", *extra], check=True, capture_output=True)
    return time.perf_counter() - start


def proxy(names: list[str]) -> None:
    from scipy.stats import spearmanr

    rows = []
    for name in names:
        row = {"network": name, "load_before": round(os.getloadavg()[0], 2)}
        path = RESULTS / f"_{name}_proxy.json"
        row["seconds"] = round(_importance(name, path), 1)
        table = fxmerge.ImportanceTable.from_json(path.read_text())
        row["keys"] = len(table)
        row["calibration"] = "x".join(map(str, table.settings.calibration_shape))
        if name in ("resnet50", "mobilenet_v2"):
            ref_path = RESULTS / f"_{name}_reference.json"
            row["reference_seconds"] = round(_importance(name, ref_path, *REFERENCE), 1)
            reference = fxmerge.ImportanceTable.from_json(ref_path.read_text())
            keys = list(reference.values)
            multi = [k for k in keys if isinstance(k, fxmerge.Entry) and k.j - k.i > 1]
            for label, subset in (("spearman", keys), ("spearman_multi_conv", multi)):
                row[label] = round(float(spearmanr([reference[k] for k in subset],
                                                   [table[k] for k in subset]).statistic), 4)
            ref_path.unlink()
        path.unlink()
        row["load_after"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(row, flush=True)
    write("scale_proxy", {"command": "fxmerge importance torchvision:NAME (random weights, "
                                     "input 1x3x224x224, default calibration), wall clock",
                          "reference": "the same with " + " ".join(REFERENCE)},
          rows, ["network", "keys", "calibration", "seconds", "reference_seconds", "spearman",
                 "spearman_multi_conv", "load_before", "load_after"],
          "The output-agreement importance table at scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(NETWORKS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keys", type=int, default=32, help="importance keys timed")
    parser.add_argument("--proxy", action="store_true",
                        help="time the whole proxy table as `fxmerge importance` makes it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        proxy(args.only or ["resnet152", "resnet50", "mobilenet_v2"])
        return
    if args.child:
        print(json.dumps(child(args.child, args.size, args.keys)))
        return
    rows = []
    for name in args.only or NETWORKS:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--size",
                               str(args.size), "--keys", str(args.keys)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"network": name, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    columns = ["network", "convs", "searched", "blocks", "entries", "timed_convs", "budget",
               "inference_peak_mb", "trace_s", "trace_peak_mb", "analyze_s",
               "analyze_peak_mb", "latency_s", "latency_peak_mb", "importance_ms_per_key",
               "importance_projected_s", "importance_peak_mb", "solve_s", "solve_peak_mb",
               "transform_s", "transform_peak_mb", "transform_vs_inference", "transform_solved_s",
               "error",
               "identity_error", "random_error",
               "load_before", "load_after"]
    write("scale", {"input": f"1x3x{args.size}x{args.size}", "backend": "eager CPU",
                    "importance": f"output agreement, {args.keys} sampled keys timed",
                    "solve": "layermerge, halfway to the fastest plan, random importances",
                    "peak": "resident high-water mark of the stage alone, MiB, process "
                            "baseline included"},
          rows, columns, "Cost of each fxmerge stage as networks grow")
    plot([r for r in rows if "entries" in r])


if __name__ == "__main__":
    main()
