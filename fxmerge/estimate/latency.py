"""Measuring latency tables: each entry `(i, j, k, dw)` is timed as the single conv it would
become, in the form the merge gives it (channels, taps, dilation, groups, stride, padding
`k // 2`, each per axis, on the real input shape at position `i`: `MergeSpace.merged_conv`)
followed by the network's activation at `j`. Entries that share a conv signature are timed
once, side by side with the others (`backends.timing.time_layers`)."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import fx, nn

from ..algebra import CONV_MODULES
from ..backends.runtimes import Backend, get_backend, plan_runner
from ..backends.timing import (
    ConstantWeights,
    Run,
    Timing,
    check_load,
    fastest,
    link_groups,
    machine_description,
    time_callable,
    time_layers,
    timing_inputs,
    using_threads,
)
from ..capture.families.activation import ACTIVATION_CLASSES
from ..plan import Plan
from ..sides import Sides, compact, label, per_axis
from ..space import IDENTITY, Entry, MergeSpace, require_space_of
from ..tables import Check, LatencySettings, LatencyTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    """Everything that decides the run time of one merged layer."""

    input_shape: tuple[int, ...]
    out_channels: int
    kernel: Sides  # these four per axis (`fxmerge.sides`)
    stride: Sides
    padding: Sides
    groups: int
    activation: str | None
    dilation: Sides = 1

    @property
    def label(self) -> str:
        """The layer in one line (what the timing cache is keyed by)."""
        dilation = f" d{label(self.dilation)}" if self.dilation != 1 else ""
        return (f"{'x'.join(map(str, self.input_shape))}->{self.out_channels} "
                f"k{label(self.kernel)}{dilation} s{label(self.stride)} "
                f"p{label(self.padding)} g{self.groups} "
                f"{self.activation or 'none'}")

    def module(self, device: torch.device, dtype: torch.dtype,
               weights: ConstantWeights | None = None) -> nn.Module:
        """The layer (a conv of the input's spatial rank), its weights a constant (timed
        weights need no random initialisation), made by `weights` where given."""
        conv_type = CONV_MODULES[len(self.input_shape) - 2]
        conv = conv_type(self.input_shape[1], self.out_channels, self.kernel, self.stride,
                         self.padding, self.dilation, self.groups, device="meta", dtype=dtype)
        weights = weights or ConstantWeights(device, dtype, conv.weight.numel())
        conv.weight = nn.Parameter(weights(conv.weight.shape), requires_grad=False)
        conv.bias = nn.Parameter(torch.zeros(self.out_channels, device=device, dtype=dtype),
                                 requires_grad=False)
        if self.activation is None:
            return conv
        return nn.Sequential(conv, ACTIVATION_CLASSES[self.activation]())

    def weight_bytes(self, dtype: torch.dtype) -> int:
        rank = len(self.input_shape) - 2
        return (self.out_channels * self.input_shape[1] // self.groups
                * math.prod(per_axis(self.kernel, rank)) * dtype.itemsize)

    def output_bytes(self, dtype: torch.dtype) -> int:
        batch, _, *sides = self.input_shape
        stride = per_axis(self.stride, len(sides))
        return (batch * self.out_channels
                * math.prod(-(-s // t) for s, t in zip(sides, stride)) * dtype.itemsize)


def entry_layer(space: MergeSpace, entry: Entry, batch_size: int | None = None) -> LayerSpec:
    """The layer one table entry is timed as: the conv `space.merged_conv` says the merge
    makes, followed by `space.end_activation`."""
    i, j, k, _ = entry
    shape = list(space.input_shape(i))
    if batch_size is not None:
        shape[0] = batch_size
    rank = len(shape) - 2
    stride = (1,) * rank
    for c in space.convs[i:j]:  # strided convs are irreducible, so always kept
        stride = tuple(s * t for s, t in zip(stride, per_axis(c.stride, rank)))
    merged = space.merged_conv(entry)
    return LayerSpec(tuple(shape), space.conv(j).out_channels, merged.kernel, compact(stride),
                     compact([e // 2 for e in per_axis(k, rank)]), merged.groups,
                     space.end_activation(i, j), merged.dilation)


# A whole network costs its searched convs (the table's sum) plus what the search leaves
# out (stem, head, skip adds, norms, attention), less what running in context saves. A
# table whose sum is outside these bounds, as a fraction of the whole network timed on the
# same backend, was timed under other conditions than the network (a loaded machine).
PLAUSIBLE_TABLE_SHARE = (0.2, 3.0)
STATISTIC = "mean of the fastest tenth"  # of each layer's runs (`fastest`)


def measure_latency(
    space: MergeSpace,
    gm: fx.GraphModule | None = None,
    *,
    backend: Backend | str = Backend.EAGER,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 10,
    repeat: int = 100,
    seconds: float = 0.4,
    threads: int | None = None,
    cache: str | Path | None = None,
    deduplicate: bool = True,
    check: bool | None = None,
    progress: bool | None = None,
) -> LatencyTable:
    """Time every entry of `space` as its single merged layer; identity costs nothing.

    Each timing is the mean of the fastest tenth of up to `repeat` runs after up to `warmup`
    runs (`backends.timing.fastest`), as many as fit in about `seconds` per layer (at least
    `MIN_TIMED_RUNS`; their spread is recorded), so fast layers get many runs and slow ones,
    which no budget would pick, few. The layers are timed side by side, one run each per
    round, in a new order each round (`time_layers`).
    Distinct conv layers are timed once (`deduplicate=False` times every entry, to measure
    what that saves). With `cache`, the runs are written to that JSON file as they are
    timed, and a rerun with the same settings resumes where it stopped. With `check` (by default,
    when `gm`, the graph `space` was analysed from, is given), the original
    network (BatchNorm folded) is timed whole on the same backend; a table whose sum is not a
    plausible share of it (`PLAUSIBLE_TABLE_SHARE`) is timed again, and if it still is not,
    a warning says so and `settings.check` records it (`Check.FAILED`, with the reason in
    `check_failure`; `solve` repeats the warning). `threads`: time with this many intra-op
    threads (torch's number is restored after); a table holds at the thread count it was
    timed with, recorded in `settings.threads`. A machine busier than its cores while
    timing gets a `BusyMachineWarning`.
    """
    backend = get_backend(backend)
    if check is None:
        check = gm is not None
    if check:
        require_space_of(space, gm, "measure_latency")
    device = torch.device(device)
    with using_threads(threads):  # restored after
        batch = batch_size or space.input_shape(0)[0]
        settings = LatencySettings(
            backend=backend, device=str(device), machine=machine_description(device),
            batch_size=batch, dtype=str(dtype), warmup=warmup, repeat=repeat,
            seconds_per_layer=seconds, threads=torch.get_num_threads(),
            torch=torch.__version__, statistic=STATISTIC)
        layers = {e: entry_layer(space, e, batch_size) for e in space.entries
                  if (e.k, e.dw) != IDENTITY}
        jobs = {_job_key(job, layers): layers[job] if isinstance(job, Entry) else job
                for job in (dict.fromkeys(layers.values()) if deduplicate else layers)}
        samples, targets = _load_cache(cache, settings)
        started = time.perf_counter()
        timing = {"backend": backend, "device": device, "dtype": dtype, "warmup": warmup,
                  "repeat": repeat, "seconds": seconds, "progress": progress,
                  "save": lambda: _save_cache(cache, settings, samples, targets)}
        for attempt in (1, 2):
            todo = {key: layer for key, layer in jobs.items()
                    if len(samples.get(key, ())) < targets.get(key, 1)}
            time_layers(todo, samples, targets, desc="latency table", **timing)
            runs = link_groups(samples)
            ms = {key: fastest(t) for key, t in runs.items()}
            values = {e: 0.0 for e in space.entries if e not in layers}  # removing a conv
            values.update({e: ms[_job_key(layer if deduplicate else e, layers)]
                           for e, layer in layers.items()})
            settings = replace(
                settings, spread=round(statistics.median(Timing.of(runs[key]).spread
                                                         for key in jobs), 4) if jobs else None)
            table = LatencyTable(values, space.signature, settings, space.input_shapes)
            if not check:
                break
            verdict = _check_against_network(table, space, gm, backend, device, dtype, batch)
            if verdict is None or attempt == 2:
                break
            log.warning("%s; timing the table again", verdict)
            samples, targets = {}, {}
        if check and verdict is not None:
            table.settings = replace(table.settings, check=Check.FAILED, check_failure=verdict)
            warnings.warn(f"latency table: {verdict}; the machine was probably busy: time it "
                          "again on an idle machine", stacklevel=2)
        table.settings = replace(table.settings, num_entries=len(values),
                                 num_layers=len(set(layers.values())), num_timed=len(jobs),
                                 seconds=round(time.perf_counter() - started, 3),
                                 load_average=check_load("latency table"))
        log.info("latency table: %d entries, %d distinct layers", len(values),
                 table.settings.num_layers)
        return table


def _check_against_network(table: LatencyTable, space: MergeSpace, gm: fx.GraphModule,
                           backend: str, device: torch.device, dtype: torch.dtype, batch: int
                           ) -> str | None:
    """Time the original network whole and record it in the table's settings; None if the
    table's sum is a plausible share of it, else what is wrong."""
    inputs = timing_inputs(gm, batch, device)
    run = plan_runner(gm, Plan.identity(space), backend, inputs, dtype)
    network = time_callable(lambda: run(*inputs), device, warmup=3, repeat=10)
    share = table.identity_latency(space) / network.ms
    table.settings = replace(table.settings, network_ms=round(network.ms, 6),
                             table_share=round(share, 4), check=Check.OK)
    low, high = PLAUSIBLE_TABLE_SHARE
    if low <= share <= high:
        return None
    return (f"the table sums to {share:.2f}x the whole original network's "
            f"{network.ms:.4g} ms (plausible: {low} to {high})")


def _job_key(job: LayerSpec | Entry, layers: dict) -> str:
    return job.label if isinstance(job, LayerSpec) else f"entry {tuple(job)} {layers[job].label}"


def _load_cache(cache: str | Path | None, settings: LatencySettings
                ) -> tuple[dict[str, list[Run]], dict[str, int]]:
    """Each layer's timed runs so far and how many it is to get, from `cache`, if it has
    these settings."""
    if cache is None or not Path(cache).is_file():
        return {}, {}
    data = json.loads(Path(cache).read_text())
    if data.get("settings") != settings.timing_conditions() or "targets" not in data:
        log.warning("latency cache %s has other settings; ignoring it", cache)
        return {}, {}
    return ({key: [Run(*run) for run in s] for key, s in data["timings"].items()},
            data["targets"])


def _save_cache(cache: str | Path | None, settings: LatencySettings,
                samples: dict[str, list[Run]], targets: dict[str, int]) -> None:
    if cache is None:
        return
    path = Path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"settings": settings.timing_conditions(), "timings": samples,
                               "targets": targets}))
    tmp.replace(path)
