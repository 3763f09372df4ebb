"""Latency tables: the measured cost of every candidate merged layer.

Each entry `(i, j, k, dw)` is timed as the single conv it would become, in the form the
merge gives it (channels, taps, dilation, groups, stride, padding `k // 2`, each per axis, on
the real input shape at position `i`: `MergeSpace.merged_conv`) followed by the network's
activation at `j`.
Entries that share a conv signature are timed once, each to a time budget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch
from torch import fx, nn

from ..algebra import CONV_MODULES
from ..backends.runtimes import Backend, get_backend, plan_runner, prepare
from ..backends.timing import (
    Timing,
    check_load,
    clock,
    machine_description,
    steady_memory,
    time_callable,
    timing_inputs,
    using_threads,
)
from ..capture.families.activation import ACTIVATION_CLASSES
from ..errors import TableError
from ..plan import Plan
from ..progress import progress as iterate
from ..sides import Sides, compact, label, per_axis
from ..space import IDENTITY, Entry, MergeSpace, require_space_of
from .base import EntryTable, TableSettings

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

    def module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The layer (a conv of the input's spatial rank), its weights a constant: timed
        weights need no random initialisation."""
        conv_type = CONV_MODULES[len(self.input_shape) - 2]
        conv = conv_type(self.input_shape[1], self.out_channels, self.kernel, self.stride,
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
    rank = len(shape) - 2
    stride = (1,) * rank
    for c in space.convs[i:j]:  # strided convs are irreducible, so always kept
        stride = tuple(s * t for s, t in zip(stride, per_axis(c.stride, rank)))
    merged = space.merged_conv(entry)
    return LayerSpec(tuple(shape), space.conv(j).out_channels, merged.kernel, compact(stride),
                     compact([e // 2 for e in per_axis(k, rank)]), merged.groups,
                     space.end_activation(i, j), merged.dilation)


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
    retimed: int | None = None  # layers timed again (their median was uncertain)
    unsettled: int | None = None  # layers whose median stayed uncertain (see SETTLE)
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


def _weight_bytes(layer: LayerSpec, dtype: torch.dtype) -> int:
    rank = len(layer.input_shape) - 2
    return (layer.out_channels * layer.input_shape[1] // layer.groups
            * math.prod(per_axis(layer.kernel, rank)) * dtype.itemsize)


def _output_bytes(layer: LayerSpec, dtype: torch.dtype) -> int:
    batch, _, *sides = layer.input_shape
    stride = per_axis(layer.stride, len(sides))
    return (batch * layer.out_channels * math.prod(-(-s // t) for s, t in zip(sides, stride))
            * dtype.itemsize)


def _group_bytes(group: list[LayerSpec], dtype: torch.dtype) -> int:
    """What a group of built layers holds: their weights, one input per input shape (the
    layers share it) and, while one runs, its output."""
    inputs = {layer.input_shape for layer in group}
    return (sum(_weight_bytes(layer, dtype) for layer in group)
            + sum(math.prod(shape) for shape in inputs) * dtype.itemsize
            + max((_output_bytes(layer, dtype) for layer in group), default=0))


# Layers are timed side by side: every round runs each layer once, in a new random order
# (seeded by the round), so the machine's drift (a shared VM's speed wanders by tens of
# percent over seconds) reaches every layer alike instead of deciding the one it hits, and
# no layer's median carries the cache its fixed neighbours leave (docs/method.md §2). A
# layer slower than its share of `seconds` runs in fewer rounds, spread evenly over them
# (at least `MIN_TIMED_RUNS`). What drift is left is divided out (`steady`): a round whose
# layers all ran slower than their medians was a slow round. Layers are built GROUP_BYTES
# at a time (`_group_bytes`), each group timed in its own rounds; with several groups, the
# ANCHORS smallest layers are timed in every group, so that `steady` can also divide out
# the machine's speed in each group's stretch of time. A layer whose median is still
# uncertain after the rounds (its standard error over SETTLE of it) is timed again for as
# many rounds, among such layers (`retimed`; `unsettled` if it still is). Memory is held
# steady while timing (`steady_memory`: no page faults that come and go with the heap).
MIN_TIMED_RUNS = 5
GROUP_BYTES = 1 << 30
ANCHORS = 5
SETTLE = 0.03


class Run(NamedTuple):
    """One timed run of a layer: the group it was built in and the round, each numbered
    across the table, and its milliseconds."""

    group: int
    round: int
    ms: float


def _factors(values: dict[str, list[float]], typical: dict[str, list[float]],
             samples: dict[str, list[Run]], by: str) -> dict[int, float]:
    """Per group or round (`by`): the median, over the layers run in it, of the median of
    their `values` there over the median of their `typical` runs; 1 where fewer than 3
    layers ran."""
    median = {key: statistics.median(ms) for key, ms in typical.items()}
    there: dict[int, dict[str, list[float]]] = {}
    for key, s in samples.items():
        for run, ms in zip(s, values[key]):
            there.setdefault(getattr(run, by), {}).setdefault(key, []).append(ms)
    return {at: statistics.median(statistics.median(ms) / median[key] for key, ms in t.items())
            if len(t) >= 3 else 1.0 for at, t in there.items()}


def steady(samples: dict[str, list[Run]], passes: int = 3) -> dict[str, list[float]]:
    """Each layer's runs with the machine's speed divided out: first each group's (from the
    layers timed in several groups), then each round's (a factor is the median, over the
    layers run there, of their runs there over their medians, in `passes` refinements).
    Milliseconds at the table's typical speed."""
    raw = {key: [run.ms for run in s] for key, s in samples.items()}
    linked = {key: s for key, s in samples.items() if len({run.group for run in s}) > 1}
    if linked:
        linked_raw = {key: raw[key] for key in linked}
        group = _factors(linked_raw, linked_raw, linked, "group")
        raw = {key: [run.ms / group.get(run.group, 1.0) for run in s]
               for key, s in samples.items()}
    runs = raw
    for _ in range(passes):
        factor = _factors(raw, runs, samples, "round")
        runs = {key: [ms / factor[run.round] for run, ms in zip(s, raw[key])]
                for key, s in samples.items()}
    return runs


def uncertainty(samples: list[float]) -> float:
    """The standard error of the samples' median relative to it (normal approximation:
    1.25 sigma / sqrt(n), sigma from the interquartile range); inf below 3 samples."""
    if len(samples) < 3:
        return math.inf
    timing = Timing.of(samples)
    return 1.2533 * timing.spread / 1.349 / math.sqrt(len(samples))


def _pack(keys: list[str], layers: dict[str, LayerSpec], dtype: torch.dtype,
          held: list[str]) -> list[list[str]]:
    """`keys` in order, in groups of at most GROUP_BYTES, each also holding `held` (a
    larger layer alone)."""
    groups: list[list[str]] = [[]]
    for key in keys:
        if groups[-1] and _group_bytes([layers[k] for k in held + groups[-1] + [key]],
                                       dtype) > GROUP_BYTES:
            groups.append([])
        groups[-1].append(key)
    return groups


def _groups(layers: dict[str, LayerSpec], dtype: torch.dtype) -> list[list[str]]:
    """The layers in groups of at most GROUP_BYTES, each holding the ANCHORS smallest
    where there are several."""
    groups = _pack(list(layers), layers, dtype, [])
    if len(groups) == 1:
        return groups
    anchors = sorted(layers, key=lambda key: _group_bytes([layers[key]], dtype))[:ANCHORS]
    rest = [key for key in layers if key not in anchors]
    return [anchors + g for g in _pack(rest, layers, dtype, anchors)]


def time_layers(layers: dict[str, LayerSpec], samples: dict[str, list[Run]],
                targets: dict[str, int], *, backend: Backend, device: torch.device,
                dtype: torch.dtype, warmup: int, repeat: int, seconds: float,
                desc: str, progress: bool | None, save: Callable[[], None]) -> None:
    """Time the layers side by side in `repeat` rounds per group (see above), appending
    each run to `samples[key]` (groups and rounds numbered on from those there). A layer
    runs until it has `targets[key]` runs; one without a target (or that has reached it)
    gets as many more as fit in `seconds`, its target set so. `save()` is called after
    every round (the cache)."""
    groups = _groups(layers, dtype)
    done = [run for s in samples.values() for run in s]
    group = 1 + max((run.group for run in done), default=-1)
    round_ = 1 + max((run.round for run in done), default=-1)
    rounds = [(g, r) for g in range(len(groups)) for r in range(repeat)]
    runs: dict[str, int] = {}  # how many of the `repeat` rounds each layer runs in
    built: dict[str, Callable] = {}
    with torch.inference_mode(), steady_memory():
        for n, (g, r) in enumerate(iterate(rounds, desc, "round", progress)):
            if r == 0:
                built.clear()  # the last group's layers are freed before the next is built
                inputs = {shape: torch.randn(shape, device=device, dtype=dtype)
                          for shape in dict.fromkeys(layers[key].input_shape
                                                     for key in groups[g])}
                built.update({key: _build(layers[key], inputs[layers[key].input_shape], key,
                                          samples, targets, runs, backend, device, dtype,
                                          warmup, repeat, seconds)
                              for key in groups[g]})
                del inputs
            for key in random.Random(round_ + n).sample(groups[g], len(groups[g])):
                if (r * runs[key]) // repeat != ((r + 1) * runs[key]) // repeat:
                    samples[key].append(Run(group + g, round_ + n, clock(built[key], device)))
            save()
    built.clear()


def _build(layer: LayerSpec, x: torch.Tensor, key: str, samples: dict[str, list[Run]],
           targets: dict[str, int], runs: dict[str, int], backend: Backend,
           device: torch.device, dtype: torch.dtype, warmup: int, repeat: int,
           seconds: float) -> Callable:
    """The layer built (to run on `x`) and run once; on its first build in this timing,
    warmed up and given its number of runs (`runs`, and its target)."""
    module = layer.module(device, dtype).eval()
    fn = prepare(module, backend, x)
    fn(x)  # the first call sets the layer up (kernels chosen, compiled)
    if key not in runs:
        first = clock(lambda: fn(x), device) / 1e3
        fit = int(seconds / max(first, 1e-9))
        for _ in range(min(warmup, fit // 4)):
            fn(x)
        have = len(samples.setdefault(key, []))
        if targets.get(key, 0) <= have:
            targets[key] = have + min(repeat, max(fit, MIN_TIMED_RUNS))
        runs[key] = min(repeat, targets[key] - have)
    return lambda: fn(x)


# A whole network costs its searched convs (the table's sum) plus what the search leaves
# out (stem, head, skip adds, norms, attention), less what running in context saves. A
# table whose sum is outside these bounds, as a fraction of the whole network timed on the
# same backend, was timed under other conditions than the network (a loaded machine).
PLAUSIBLE_TABLE_SHARE = (0.2, 3.0)
def measure_latency(
    space: MergeSpace,
    gm: fx.GraphModule | None = None,
    *,
    backend: str = "eager",
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

    Each timing is the median of up to `repeat` runs after up to `warmup` runs, as many as
    fit in about `seconds` per layer (at least `MIN_TIMED_RUNS`; their spread is recorded), so
    fast layers get many runs and slow ones, which no budget would pick, few. The layers
    are timed side by side, one run each per round, so that the machine's drift reaches
    them all alike, and those whose median is still uncertain are timed again (`SETTLE`).
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
            torch=torch.__version__)
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
            runs = steady(samples)
            uncertain = {key: layer for key, layer in jobs.items()  # (few runs asked: none)
                         if repeat >= MIN_TIMED_RUNS and uncertainty(runs[key]) > SETTLE}
            if uncertain:
                time_layers(uncertain, samples, targets, desc="latency table, again", **timing)
                runs = steady(samples)
            ms = {key: statistics.median(t) for key, t in runs.items()}
            values = {e: 0.0 for e in space.entries if e not in layers}  # removing a conv
            values.update({e: ms[_job_key(layer if deduplicate else e, layers)]
                           for e, layer in layers.items()})
            settings = replace(
                settings, retimed=len(uncertain),
                unsettled=sum(uncertainty(runs[key]) > SETTLE for key in jobs),
                spread=round(statistics.median(Timing.of(runs[key]).spread for key in jobs),
                             4) if jobs else None)
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
