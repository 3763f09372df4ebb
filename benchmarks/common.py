"""Helpers shared by the benchmark scripts: machine description, result files, and a
synthetic problem (a model's space with proxy tables) for timing the solver and passes."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import fxmerge
from fxmerge import depth_keys, entry_layer

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Give BatchNorms non-trivial statistics: a few training-mode passes on random data."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn_like(x) * 2 + 0.5)
    return model.eval()


def write(name: str, meta: dict, rows: list[dict], columns: list[str], title: str,
          runs: list[dict] | None = None) -> None:
    """Write `results/<name>.json` and a markdown table `results/<name>.md`; print the table.
    `runs` (the rows `rows` summarise) go to the JSON only."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), **meta}
    data = {"meta": meta, "rows": rows} | ({"runs": runs} if runs is not None else {})
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def synthetic_problem(factory, exclude):
    """A model's space at 224x224 with a MACs-proportional latency table and random
    importance in (0.5, 1] (for timing the solver and the passes, not for accuracy)."""
    gm = fxmerge.trace(factory().eval(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm, exclude=exclude)
    macs = {}
    for e in space.entries:
        layer = entry_layer(space, e)
        _, c, h, w = layer.input_shape
        macs[e] = c * layer.out_channels * layer.kernel**2 * h * w / layer.stride**2 / layer.groups
    lat = fxmerge.LatencyTable.from_values(space, {e: v * 1e-8 for e, v in macs.items()},
                                           source="MACs proxy")
    rng = random.Random(0)
    keys = [*space.entries, *depth_keys(space),
            *fxmerge.get_method("layeronly").importance_keys(space)]
    imp = fxmerge.ImportanceTable.from_values(space, {k: rng.uniform(0.5, 1) for k in keys})
    return gm, space, lat, imp


def ort_ratio(original: str, merged: str, shape: tuple[int, ...], repeat: int = 200,
              threads: int = 2) -> float:
    """The merged ONNX model's ONNX Runtime time over the original's on one random input of
    `shape`, runs interleaved (the order swapped every round), `threads` intra-op threads;
    the median of the per-round ratios."""
    import time

    import numpy as np
    import onnxruntime

    sessions = []
    for path in (original, merged):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        sessions.append(onnxruntime.InferenceSession(str(path), options))
    x = np.random.rand(*shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(10):
            s.run(None, f)
    ratios = []
    for i in range(repeat):
        t = {}
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            t[k] = time.perf_counter() - start
        ratios.append(t[1] / t[0])
    return round(float(np.median(ratios)), 4)
