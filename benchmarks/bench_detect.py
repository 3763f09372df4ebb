"""YOLOv8n trained here from scratch on the synthetic shapes set, compressed by
`fxmerge compress ultralytics:...` (the whole job: held-out choice, ultralytics' trainer,
its validator), the compressed networks fine-tuned as long as the original was trained.
mAP50-95 on val (never chosen on) of the original and of each method at a measured 80% of
the model's time and at the lowest budget the latency table allows plus 5 points; speed-ups
timed side by side, eager PyTorch and ONNX Runtime (batch 1, the training size, 2 threads).

    python benchmarks/bench_detect.py [--epochs 20] [--seeds 0 1 2] [--out DIR]

The first seed runs every configuration (`auto` where both methods can reach the budget:
Depth's floor is the higher); the others repeat LayerMerge at 80%. Where a method's floor
plus 5 points cannot be met when measured, 3 and then 6 points more are tried.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ort_ratio, write

from fxmerge.yolo import floors as yolo_floors
from fxmerge.yolo import offline

SIZE, BATCH = 128, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    parser.add_argument("--control", action="store_true",
                        help="only add the control rows to the results: each seed's original "
                        "trained on for as many epochs as a fine-tune (in --out of a run)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="fxmerge-detect-"))
    offline(root / "ultralytics-settings")
    from fxmerge.datasets import shapes_detection

    torch.set_num_threads(2)
    if args.control:
        add_control(root, args.epochs)
        return
    data = shapes_detection(root / "shapes")
    rows, runs = [], []
    for seed in args.seeds:
        configs = [("layermerge", 0.8)]
        if seed == args.seeds[0]:
            from ultralytics import YOLO

            floors = yolo_floors(YOLO("yolov8n.yaml").model.eval(), SIZE, threads=2)
            configs = [("layermerge", 0.8), ("depth", 0.8),
                       ("layermerge", round(floors["layermerge"] + 0.05, 2)),
                       ("depth", round(floors["depth"] + 0.05, 2)),
                       ("auto", round(floors["depth"] + 0.05, 2))]
        for method, budget in configs:
            for extra in (0.0, 0.03, 0.06):  # a floor the measured solve misses: 3 points up
                run = one_job(root, data, seed, args.epochs, method, round(budget + extra, 2))
                if "dropped" not in run or budget == 0.8:
                    break
            runs.append(run)
            print(json.dumps(run), flush=True)
    for (method, budget), group in _groups(runs).items():
        done = [r for r in group if "val_map50_95" in r]
        row = {"method": method, "budget": budget, "seeds": len(group)}
        if not done:
            row["note"] = group[0]["dropped"]
            rows.append(row)
            continue
        row.update(_summary(done))
        rows.append(row)
    originals = {r["seed"]: r["original_val_map50_95"] for r in runs if "original_val_map50_95" in r}
    rows.insert(0, {"method": "original", "seeds": len(originals),
                    "val_map50_95": _mean_std(list(originals.values()))})
    write("detect_yolov8n", {"task": "YOLOv8n from yolov8n.yaml on the synthetic shapes set "
                             "(320 train images, 80 val; a third not square)",
                             "size": SIZE, "epochs": f"original {args.epochs}, each fine-tune "
                             f"{args.epochs}", "holdout": "10% of train (choice); val reports",
                             "timing": "batch 1, 2 threads, side by side, eager (original "
                             "fused by ultralytics) and ONNX Runtime"}, rows, COLUMNS, TITLE,
          runs=runs)


COLUMNS = ["method", "budget", "seeds", "val_map50_95", "holdout_map50_95", "chosen",
           "removed_convs", "removed_activations", "eager_ratio", "eager_speedup", "ort_ratio",
           "ort_speedup", "note"]
TITLE = "YOLOv8n compressed inside ultralytics (CPU)"


def add_control(root: Path, epochs: int) -> None:
    """The control the compressed networks need: the original itself trained on for
    `epochs` more on the same images (what the compressed networks got), its val mAP50-95
    as a row of the results (the original alone was trained only `epochs`)."""
    from ultralytics import YOLO

    path = RESULTS / "detect_yolov8n.json"
    results = json.loads(path.read_text())
    maps = []
    for folder in sorted(root.glob("seed*")):
        seed = int(folder.name.removeprefix("seed"))
        yolo = YOLO(str(next(folder.glob("original-train-*.pt"))))
        yolo.train(data=str(folder / "data" / "fit.yaml"), epochs=epochs, imgsz=SIZE,
                   batch=BATCH, workers=0, plots=False, device="cpu", amp=False, seed=seed,
                   project=str(folder / "runs"), name="control", exist_ok=True,
                   verbose=False)
        maps.append(round(float(yolo.val(data=str(root / "shapes" / "data.yaml"), imgsz=SIZE,
                                         batch=BATCH, workers=0, plots=False, device="cpu",
                                         verbose=False).box.map), 4))
    rows = [r for r in results["rows"] if not r["method"].startswith("original, trained")]
    rows.insert(1, {"method": f"original, trained {epochs} epochs more (control)",
                    "seeds": len(maps), "val_map50_95": _mean_std(maps)})
    meta = {k: v for k, v in results["meta"].items() if k != "machine"}
    write("detect_yolov8n", meta, rows, COLUMNS, TITLE, runs=results["runs"])


def _groups(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault((r["method"], r["budget"]), []).append(r)
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _summary(done: list[dict]) -> dict:
    first = done[0]
    return {"val_map50_95": _mean_std([r["val_map50_95"] for r in done]),
            "holdout_map50_95": _mean_std([r["holdout_map50_95"] for r in done]),
            "chosen": first["chosen"], "removed_convs": first["removed_convs"],
            "removed_activations": first["removed_activations"],
            "eager_ratio": _mean_std([r["eager_ratio"] for r in done]),
            "eager_speedup": _mean_std([1 / r["eager_ratio"] for r in done]),
            "ort_ratio": _mean_std([r["ort_ratio"] for r in done]),
            "ort_speedup": _mean_std([1 / r["ort_ratio"] for r in done])}


def _settings(seed: int, epochs: int, method: str, budget: float):
    from fxmerge.pipeline import JobSettings

    return JobSettings(budget=budget, method=method, size=SIZE, batch=BATCH,
                       epochs=epochs, train_epochs=epochs, threads=2, seed=seed)


def one_job(root: Path, data: Path, seed: int, epochs: int, method: str, budget: float
            ) -> dict:
    from fxmerge import InfeasibleBudget
    from fxmerge.yolo import run_yolo_job

    out = root / f"seed{seed}"  # one folder a seed: the original is trained once
    run = {"seed": seed, "method": method, "budget": budget}
    started = time.perf_counter()
    try:
        report = run_yolo_job("yolov8n.yaml", data, out,
                              _settings(seed, epochs, method, budget), progress=False)
    except InfeasibleBudget as exc:
        return {**run, "dropped": str(exc).splitlines()[0]}
    chosen = report["choice"]["method"]
    cand = report["candidates"][chosen]
    original = next(out.glob("original-train-*.pt"))
    ort = ort_time_ratio(original, out / "model.pt")
    return {**run, "chosen": chosen, "seconds": round(time.perf_counter() - started),
            "original_val_map50_95": report["original_val_map50_95"],
            "val_map50_95": report["val_map50_95"],
            "holdout_map50_95": cand["holdout_map50_95"],
            "removed_convs": cand["removed_convs"],
            "removed_activations": cand["removed_activations"],
            "eager_ratio": cand["timing"]["ratio"], "ort_ratio": ort}


def ort_time_ratio(original: Path, merged: Path) -> float:
    """The merged model's ONNX Runtime time over the original's, both exported by
    ultralytics (batch 1, the training size)."""
    from ultralytics import YOLO

    files = [YOLO(str(p)).export(format="onnx", imgsz=SIZE, simplify=False)
             for p in (original, merged)]
    return ort_ratio(*files, shape=(1, 3, SIZE, SIZE))


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    main()
