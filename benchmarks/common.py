"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

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
