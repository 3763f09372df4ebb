"""The output-agreement proxy against the fine-tuned importance table of a demo run: rank
correlation and cost per entry at several calibration batches.

    python benchmarks/bench_proxy.py RESULTS.json IMPORTANCE.json

RESULTS.json and IMPORTANCE.json come from `fxmerge demo --out DIR` (results.json and
importance.json, the latter seed 0's). The seed-0 network is trained again (training is
deterministic; its test accuracy must equal the recorded one), then the proxy table of the
LayerMerge entries is built at each batch, the batches interleaved, and compared with the
fine-tuned table, whose cost per entry the demo recorded.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

from common import write

from fxmerge import (
    Entry,
    ImportanceTable,
    OutputAgreement,
    agreement_importance,
    estimate_importance,
)
from fxmerge.demos import DemoConfig, spearman, train_seed

BATCHES = (64, 32, 16)
ROUNDS = 5


def multi_conv(table: ImportanceTable) -> ImportanceTable:
    values = {k: v for k, v in table.values.items() if isinstance(k, Entry) and k.j - k.i > 1}
    return ImportanceTable(values, table.signature, {})


def main(results: Path, importance: Path) -> None:
    meta = json.loads(results.read_text())["meta"]
    known = {f.name for f in fields(DemoConfig)}  # older records have other fields
    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in meta["config"].items() if k in known})
    cost = next(c for c in meta["importance_cost"] if c["seed"] == 0)
    finetune_ms = cost["finetune_importance_s"] / cost["finetune_keys"] * 1e3
    trained = train_seed(config, 0)  # as the demo's seed 0
    base = meta["original_accuracy"]
    base = base[0] if isinstance(base, list) else base
    if round(trained.base_acc, 2) != round(base, 2):
        sys.exit(f"{results}: retrained seed 0 is not the recorded network")
    data, gm, space = trained.data, trained.gm, trained.space
    finetuned = ImportanceTable.from_json(importance.read_text())
    times: dict[object, list[float]] = {b: [] for b in BATCHES}
    times["networks"] = []
    tables = {}
    for _ in range(ROUNDS):
        for batch in BATCHES:
            t0 = time.perf_counter()
            tables[batch] = agreement_importance(space, gm, data.val[0][:batch],
                                                 keys=space.entries, progress=False)
            times[batch].append((time.perf_counter() - t0) / space.num_entries * 1e3)
        t0 = time.perf_counter()  # the way it was done before: one whole network per entry
        estimate_importance(space, gm, evaluate=OutputAgreement(gm, data.val[0][:64]),
                            keys=space.entries, progress=False)
        times["networks"].append((time.perf_counter() - t0) / space.num_entries * 1e3)
    rows = [{"proxy": "cached run" if b != "networks" else "one network per entry",
             "calibration_batch": b if b != "networks" else 64,
             "spearman": round(spearman(finetuned, tables[b]), 3) if b != "networks" else "",
             "spearman_multi_conv": round(spearman(multi_conv(finetuned),
                                                   multi_conv(tables[b])), 3)
             if b != "networks" else "",
             "ms_per_entry": round(statistics.median(ts), 2),
             "cheaper_than_finetune": round(finetune_ms / statistics.median(ts), 1)}
            for b, ts in times.items()]
    write("proxy_" + results.stem, {
        "demo": meta["data"], "entries": space.num_entries,
        "finetune_ms_per_entry": round(finetune_ms, 1),
        "finetune": f"{config.importance_steps} steps at batch {config.batch}, "
                    "scored on 300 validation images (the demo's seed 0, as recorded)",
        "rounds": ROUNDS, "statistic": "median ms per entry, batches interleaved"},
        rows, ["proxy", "calibration_batch", "spearman", "spearman_multi_conv",
               "ms_per_entry", "cheaper_than_finetune"],
        "Output-agreement proxy against the fine-tuned importance table (CPU)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
