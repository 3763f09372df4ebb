"""report.md: what the job did, on which images, and what it gave."""

from __future__ import annotations

from pathlib import Path

from ..plan import Plan


def _conditions(t: dict) -> str:
    """Where the timings were taken, and the same networks' ratio in the other conditions."""
    other = t.get("other")
    return (f"in a process with the {t['allocator']} allocator" + (
        f" (with the {other['allocator']} one: {other['ratio']:.1%} of the original's "
        f"{other['original_ms']:.4g} ms)" if other else ""))


def summary_line(report: dict, out: Path) -> str:
    """The job in one line: the choice, accuracy (or mean IoU), speed-up and where the
    report is."""
    t, choice = report["timing"], report["choice"]
    return (f"{choice['method']} at {report['settings']['budget']:.0%}: val "
            f"{report.get('metric', 'accuracy')} "
            f"{report['accuracy_original']:.2f}% -> {report['accuracy_compressed']:.2f}%, "
            f"{t['speedup']:.2f}x faster ({t['original_ms']:.4g} -> {t['merged_ms']:.4g} ms, "
            f"{t['backend']}, batch {t['batch']}, {t['threads']} threads, {t['allocator']} "
            "allocator); "
            f"{choice['reason']}; report in {out / 'report.md'}")


def render(report: dict, plan: Plan) -> str:
    """report.md: what was done, on which images, and what it gave."""
    s, t, n = report["settings"], report["timing"], report["images"]
    distilled = (f"distilling from the original (weight {s['kd_weight']}, temperature "
                 f"{s['kd_temperature']})" if s["kd_weight"] > 0 else "without distillation")
    space, m, choice = report["space"], plan.measured, report["choice"]
    metric = report.get("metric", "accuracy")
    rows = [f"| {name} | {c['holdout']:.2f} | {c['val']:.2f} | {c['timing']['speedup']:.2f}x "
            f"| {c['blocks']} | {c['removed_convs']} | {c['removed_activations']} | "
            f"{c['plan']} |" for name, c in report["candidates"].items()]
    lines = [
        f"# fxmerge compress: {report['model'] or 'model'}",
        "",
        (f"{choice['method']} at a budget of {s['budget']:.0%} of the original's latency "
         f"({s['budget_basis']}), timed on {t['backend']} at batch {t['batch']} with "
         f"{t['threads']} threads, {_conditions(t)}."),
        "",
        "| | original | compressed |",
        "|---|---|---|",
        (f"| {metric} (val, %) | {report['accuracy_original']:.2f} | "
         f"{report['accuracy_compressed']:.2f} |"),
        f"| latency (ms) | {t['original_ms']:.4g} | {t['merged_ms']:.4g} |",
        f"| speed-up | 1.00 | {t['speedup']:.2f}x |",
        "",
        (f"**Which images chose it.** {n['holdout']} images held out of train/ (a stratified "
         f"{s['holdout']:.0%}, seed {s['seed']}) scored the importance table, the solves "
         f"and the choice; the fine-tunes trained on the other {n['fit']}; val/ "
         f"({n['val']} images) was read only for this report."),
        "",
        f"**The choice.** {choice['reason']}.",
        "",
        (f"| method | held-out {metric} (%) | val {metric} (%) | speed-up | blocks | convs "
         "removed | activations removed | plan |"),
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(f"- {name}: {why}" for name, why in report.get("dropped", {}).items()),
        *([f"- warning: {report['teacher_warning']}"] if "teacher_warning" in report else []),
        "",
        (f"The solve timed {m.get('rounds')} plan(s); the chosen one measured "
         f"{m.get('ratio', float('nan')):.1%} ± {m.get('scatter', 0.0):.1%} of the original "
         f"over fresh preparations (predicted {m.get('predicted_ratio', float('nan')):.1%})."
         if m else
         "The plan was solved on the latency table's sum (no network timed)."),
        "",
        (f"Before fine-tuning the chosen pruned network scored "
         f"{report['accuracy_pruned_before_finetune']:.2f}% on the held-out images; each "
         f"candidate was fine-tuned for {s['epochs']} epochs {distilled}."),
        "",
        (f"Space: {space['convs']} convs, {space['blocks']} blocks, {space['entries']} "
         f"entries (captured by {space['capture']}); importance: {s['importance']}."),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()),
        "",
        (f"Files: merged.safetensors (`fxmerge.load`), {report['onnx']}, plan.json (the "
         "chosen plan), plan-METHOD.json, latency.json, frontier.png."),
        "",
        "## Plan",
        "",
        "```",
        plan.describe(),
        "```",
        "",
    ]
    return "\n".join(lines)
