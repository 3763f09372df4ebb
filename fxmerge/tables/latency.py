"""Latency tables: the measured cost of every candidate merged layer.

Each entry `(i, j, k, dw)` is timed as the single conv it would become, in the form the
merge gives it (channels, taps, dilation, groups, stride, padding `k // 2`, on the real input
shape at position `i`: `MergeSpace.merged_conv`) followed by the network's activation at `j`.
Entries that share a conv signature are timed once, each to a time budget.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace
from enum import Enum
from itertools import pairwise
from pathlib import Path

import torch
from torch import fx, nn

from ..algebra import CONV_MODULES
from ..backends.runtimes import Backend, get_backend, plan_runner, prepare
from ..backends.timing import (
    Timing,
    check_load,
    machine_description,
    time_callable,
    timing_inputs,
    using_threads,
)
from ..capture.families import ACTIVATION_CLASSES
from ..errors import TableError
from ..plan import Plan
from ..progress import progress as iterate
from ..space import IDENTITY, Entry, MergeSpace, require_space_of
from .base import EntryTable, TableSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    """Everything that decides the run time of one merged layer."""

    input_shape: tuple[int, ...]
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    activation: str | None
    dilation: int = 1

    @property
    def label(self) -> str:
        """The layer in one line (what the timing cache is keyed by)."""
        dilation = f" d{self.dilation}" if self.dilation != 1 else ""
        return (f"{'x'.join(map(str, self.input_shape))}->{self.out_channels} k{self.kernel}{dilation} "
                f"s{self.stride} p{self.padding} g{self.groups} {self.activation or 'none'}")

    def module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The layer (a conv of the input's spatial rank), its weights a constant: timed
        weights need no random initialisation."""
        conv = CONV_MODULES[len(self.input_shape) - 2](self.input_shape[1], self.out_channels, self.kernel, self.stride,
                         self.padding, self.dilation, self.groups, device="meta", dtype=dtype)
        conv = conv.to_empty(device=device)
        with torch.no_grad():
            conv.weight.fill_(1e-3)
            conv.bias.zero_()
        if self.activation is None:
            return conv
        return nn.Sequential(conv, ACTIVATION_CLASSES[self.activation]())


def entry_layer(space: MergeSpace, entry: Entry, batch_size: int | None = None) -> LayerSpec:
    """The layer one table entry is timed as: the conv `space.merged_conv` says the merge
    makes, followed by `space.end_activation`."""
    i, j, k, _ = entry
    shape = list(space.input_shape(i))
    if batch_size is not None:
        shape[0] = batch_size
    stride = 1
    for c in space.convs[i:j]:
        stride *= c.stride  # strided convs are irreducible, so always kept
    merged = space.merged_conv(entry)
    return LayerSpec(tuple(shape), space.conv(j).out_channels, merged.kernel, stride,
                     k // 2, merged.groups, space.end_activation(i, j), merged.dilation)


class Check(str, Enum):
    """What a latency table's check against the whole network found."""

    OK = "ok"
    FAILED = "failed"  # `check_failure` says why

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LatencySettings(TableSettings):
    """How a latency table was timed, and what its check against the network found."""

    backend: Backend = Backend.EAGER
    device: str = "cpu"
    machine: str | None = None
    batch_size: int | None = None
    dtype: str = "torch.float32"
    warmup: int | None = None
    repeat: int | None = None
    seconds_per_layer: float | None = None
    threads: int | None = None  # intra-op threads every layer was timed with
    load_average: float | None = None  # the machine's, after timing (see check_load)
    torch: str | None = None
    statistic: str = "median"
    spread: float | None = None  # median interquartile range / median over the layers
    retimed: int | None = None  # layers timed more than twice (their passes disagreed)
    unsettled: int | None = None  # layers whose timings never agreed within AGREE
    check: Check | None = None  # None: not checked
    check_failure: str | None = None
    network_ms: float | None = None  # the whole original network, timed by the check
    table_share: float | None = None  # the table's sum over `network_ms`
    num_entries: int | None = None
    num_layers: int | None = None  # distinct convs
    num_timed: int | None = None
    seconds: float | None = None  # the time the table took

    def __post_init__(self) -> None:  # JSON's strings as the enums they name
        object.__setattr__(self, "backend", get_backend(self.backend))
        if self.check is not None:
            object.__setattr__(self, "check", Check(self.check))

    def timing_conditions(self) -> dict:
        """What a cached timing must share to be reused."""
        return {k: v for k, v in asdict(self).items()
                if k in ("backend", "device", "machine", "batch_size", "dtype", "warmup",
                         "repeat", "seconds_per_layer", "threads", "torch", "statistic")}


class LatencyTable(EntryTable):
    """Milliseconds per entry; `num_layers` is how many distinct convs were timed."""

    kind = "latency"
    positive = True
    settings_type = LatencySettings

    @property
    def check_failure(self) -> str | None:
        """Why the table failed its check against the whole network, or None."""
        if self.settings.check is Check.FAILED:
            return self.settings.check_failure or "no reason recorded"
        return None

    def identity_latency(self, space: MergeSpace) -> float:
        """The original network's table latency: every conv its own block."""
        self.check_graph(space)
        total = 0.0
        for c in space.convs:
            entry = space.full_entries.get((c.index - 1, c.index))
            if entry is None:
                raise TableError(f"no single-conv entry for {c.name}")
            total += self[entry]
        return total


def time_layer(layer: LayerSpec, *, backend: str, device: torch.device,
                   dtype: torch.dtype, warmup: int, repeat: int, seconds: float) -> Timing:
    """One layer built, timed to a budget of `seconds` (see `time_callable`), and freed."""
    module = layer.module(device, dtype).eval()
    x = torch.randn(layer.input_shape, device=device, dtype=dtype)
    fn = prepare(module, backend, x)
    return time_callable(lambda: fn(x), device, warmup=warmup, repeat=repeat, seconds=seconds)


# A whole network costs its searched convs (the table's sum) plus what the search leaves
# out (stem, head, skip adds, norms, attention), less what running in context saves. A
# table whose sum is outside these bounds, as a fraction of the whole network timed on the
# same backend, was timed under other conditions than the network (a loaded machine).
PLAUSIBLE_TABLE_SHARE = (0.2, 3.0)
# Each layer is timed in two passes over the table (the second in reverse order, on half the
# time budget); a layer whose two timings differ by more than AGREE is timed again, in later
# passes, until two of its timings agree (their mean is its value) or MAX_PASSES have run
# (the median, counted as `unsettled`). One pass alone let a transient stall of the machine
# decide an entry (once 5x off between two tables built back to back).
AGREE = 0.10
MAX_PASSES = 4


def _settled(samples: list[float]) -> float | None:
    """A layer's latency once two of its timings agree within `AGREE`: the mean of the
    closest two; None before."""
    ordered = sorted(samples)
    gaps = [(b / a - 1, (a + b) / 2) for a, b in pairwise(ordered) if a > 0]
    gap, mean = min(gaps, default=(math.inf, None))
    return mean if gap <= AGREE else None


def measure_latency(
    space: MergeSpace,
    gm: fx.GraphModule | None = None,
    *,
    backend: str = "eager",
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 10,
    repeat: int = 30,
    seconds: float = 0.3,
    threads: int | None = None,
    cache: str | Path | None = None,
    deduplicate: bool = True,
    check: bool | None = None,
    progress: bool | None = None,
) -> LatencyTable:
    """Time every entry of `space` as its single merged layer; identity costs nothing.

    Each timing is the median of up to `repeat` runs after up to `warmup` runs, as many as
    fit in about `seconds` per layer (at least 3 timed runs; their spread is recorded), so
    fast layers get many runs and slow ones, which no budget would pick, few. Every layer
    is timed in two passes over the table and again where they disagree (`AGREE`,
    `MAX_PASSES`), so no single stall of the machine decides an entry. Distinct conv
    layers are timed once (`deduplicate=False` times every entry, to measure what that
    saves). With `cache`, each timing is written to that JSON file as soon as it is known,
    and a rerun with the same settings resumes where it stopped. With `check` (by default,
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
            torch=torch.__version__)
        layers = {e: entry_layer(space, e, batch_size) for e in space.entries
                  if (e.k, e.dw) != IDENTITY}
        jobs = list(dict.fromkeys(layers.values())) if deduplicate else list(layers)
        timings = _load_cache(cache, settings)
        started = time.perf_counter()
        for attempt in (1, 2):
            spreads: list[float] = []
            for n in range(MAX_PASSES):  # each pass times what has not settled yet
                todo = [job for job in jobs if len(timings.get(_job_key(job, layers), ())) <= n
                        and (n < 2 or _settled(timings[_job_key(job, layers)]) is None)]
                if not todo:
                    break
                name = "latency table" if n == 0 else f"latency table, pass {n + 1}"
                for job in iterate(todo[::-1] if n % 2 else todo, name, "layer", progress):
                    layer = layers[job] if isinstance(job, Entry) else job
                    timing = time_layer(layer, backend=backend, device=device, dtype=dtype,
                                        warmup=warmup, repeat=repeat,
                                        seconds=seconds if n == 0 else seconds / 2)
                    timings.setdefault(_job_key(job, layers), []).append(timing.ms)
                    spreads.append(timing.spread)
                    _save_cache(cache, settings, timings)
            settled = {key: _settled(t) for key, t in timings.items()}
            ms = {key: settled[key] or statistics.median(t) for key, t in timings.items()}
            values = {e: 0.0 for e in space.entries if e not in layers}  # removing a conv
            values.update({e: ms[_job_key(layer if deduplicate else e, layers)]
                           for e, layer in layers.items()})
            settings = replace(settings, retimed=sum(len(t) > 2 for t in timings.values()),
                               unsettled=sum(s is None for s in settled.values()))
            if spreads:
                settings = replace(settings, spread=round(statistics.median(spreads), 4))
            table = LatencyTable(values, space.signature, settings, space.input_shapes)
            if not check:
                break
            verdict = _check_against_network(table, space, gm, backend, device, dtype, batch)
            if verdict is None or attempt == 2:
                break
            log.warning("%s; timing the table again", verdict)
            timings = {}
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
                ) -> dict[str, list[float]]:
    """Each layer's timings so far (one per pass) from `cache`, if it has these settings."""
    if cache is None or not Path(cache).is_file():
        return {}
    data = json.loads(Path(cache).read_text())
    if data.get("settings") != settings.timing_conditions():
        log.warning("latency cache %s has other settings; ignoring it", cache)
        return {}
    return {k: v if isinstance(v, list) else [v] for k, v in data["timings"].items()}


def _save_cache(cache: str | Path | None, settings: LatencySettings, timings: dict) -> None:
    if cache is None:
        return
    path = Path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"settings": settings.timing_conditions(), "timings": timings},
                              indent=1))
    tmp.replace(path)

