"""Timing: robust statistics, side-by-side (interleaved) runs, the inputs a whole network is
timed on. What a network runs on is `runtimes.prepare`'s."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Protocol

import torch
from torch import fx, nn

from ..capture.trace import ExampleInputs, as_tuple, example_inputs
from ..errors import ArgumentError, one_of
from ..progress import progress as iterate
from .runtimes import Backend, prepare

PREPARATIONS = 3  # fresh preparations per whole-network timing (docs/method.md §3b)


@dataclass(frozen=True)
class Timing:
    """Milliseconds of repeated runs: the median, the quartiles and how many runs."""

    ms: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        if len(samples) < 2:
            return cls(samples[0], samples[0], samples[0], len(samples))
        q1, _, q3 = statistics.quantiles(samples, n=4)
        return cls(statistics.median(samples), q1, q3, len(samples))

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.ms if self.ms > 0 else 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], Any], device: torch.device) -> float:
    """One run of `fn()`, in milliseconds (CUDA events on a GPU, `perf_counter` on a CPU)."""
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# glibc's malloc hands a large freed block back to the system and maps the next afresh, so
# a layer with an output of tens of MB can page-fault all of it on every run, or not, as
# the heap happens to lie: one build of a layer ran 1.5-4x slower than the next (a 32->96
# 1x1 conv at 8x32x112x112: 36 ms, 18,818 page faults a run; 8.5 ms, none, with freed
# memory held). Timing holds freed memory, as jemalloc and tcmalloc do, and afterwards
# leaves malloc where glibc's own adjustment ends on 64-bit (maps from 32 MiB, trims
# over 64 MiB).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HELD = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 1 << 30}
SETTLED = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


class Allocator(str, Enum):
    """How the process a network is deployed in handles freed memory: what its timings
    (and so a measured budget) assume."""

    HELD = "held"  # freed memory kept for reuse, as jemalloc and tcmalloc do, or glibc with
    # MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB (`HELD_ENVIRONMENT`)
    DEFAULT = "default"  # a plain process: glibc's own thresholds, adjusted as it runs

    def __str__(self) -> str:
        return self.value


HELD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def get_allocator(name: str | Allocator) -> Allocator:
    """The allocator `name` names; `ArgumentError` listing them for anything else."""
    return one_of(Allocator, name, "allocator")


def hold_freed_memory() -> bool:
    """Make malloc (glibc) keep freed memory for the rest of the process, as
    `HELD_ENVIRONMENT` does from its start; False on another C library."""
    mallopt = _mallopt()
    for param, value in HELD.items() if mallopt else ():
        mallopt(param, value)
    return mallopt is not None


@contextmanager
def steady_memory() -> Iterator[None]:
    """Run the block with freed memory held by malloc (glibc), so that what is timed is
    the computation, not page faults that come and go with the heap's layout."""
    mallopt = _mallopt() if hold_freed_memory() else None
    try:
        yield
    finally:
        for param, value in SETTLED.items() if mallopt else ():
            mallopt(param, value)


def _samples(fn: Callable[[], Any], device: torch.device, repeat: int) -> list[float]:
    return [clock(fn, device) for _ in range(repeat)]


def time_callable(fn: Callable[[], Any], device: torch.device, *, warmup: int,
                  repeat: int) -> Timing:
    """`fn()` timed `repeat` times after `warmup` runs."""
    with torch.inference_mode(), steady_memory():
        for _ in range(max(warmup, 0)):
            fn()
        _synchronize(device)
        return Timing.of(_samples(fn, device, repeat))


def time_interleaved(nets: dict[str, Callable], x: ExampleInputs, *, repeat: int,
                     warmup: int = 3, hold: bool = True) -> dict[str, Timing]:
    """Each network on `x` (a tensor or a tuple of inputs), timed side by side: after
    `warmup` calls each, every round calls every network once, in turn, the order reversed
    every other round, so drift, load and the place in the round hit them all alike.
    `hold`: with freed memory held (`steady_memory`); else as the process is."""
    inputs = as_tuple(x)
    device = inputs[0].device
    samples: dict[str, list[float]] = {name: [] for name in nets}
    order = list(nets)
    with torch.inference_mode(), steady_memory() if hold else nullcontext():
        for net in nets.values():
            for _ in range(warmup):
                net(*inputs)
        _synchronize(device)
        for _ in range(repeat):
            for name in order:
                samples[name] += _samples(lambda n=nets[name]: n(*inputs), device, 1)
            order.reverse()
    return {name: Timing.of(s) for name, s in samples.items()}


@dataclass(frozen=True)
class Relative:
    """One network timed against a reference over fresh preparations: its median latency,
    the median of its ratios to the reference, and the largest spread of its timings."""

    ms: float
    ratio: float
    spread: float


def time_against_reference(make: Callable[[], dict[str, Callable]], x: ExampleInputs, *,
                           repeat: int, preparations: int, warmup: int = 3,
                           reference: str = "original", hold: bool = True
                           ) -> dict[str, Relative]:
    """`make()` prepares the networks afresh (a network prepared again can run several
    percent faster or slower on a CPU); each of `preparations` sets is timed side by side
    for `repeat / preparations` interleaved rounds (at least one)."""
    rounds = -(-repeat // preparations)
    runs = [time_interleaved(make(), x, repeat=rounds, warmup=warmup, hold=hold)
            for _ in range(preparations)]
    return {name: Relative(statistics.median(r[name].ms for r in runs),
                           statistics.median(r[name].ms / r[reference].ms for r in runs),
                           max(r[name].spread for r in runs))
            for name in runs[0]}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def at_batch(inputs: ExampleInputs, batch: int | None) -> tuple[torch.Tensor, ...]:
    """Example inputs with their batch dimension set to `batch` (repeated or cut)."""
    inputs = as_tuple(inputs)
    if batch is None:
        return inputs
    out = []
    for x in inputs:
        if x.dim() == 0:
            out.append(x)
            continue
        reps = -(-batch // x.shape[0])
        out.append(x.repeat(reps, *[1] * (x.dim() - 1))[:batch].contiguous())
    return tuple(out)


def timing_inputs(gm: fx.GraphModule, batch: int | None, device: torch.device
                  ) -> tuple[torch.Tensor, ...]:
    """The graph's example inputs (recorded at capture) at `batch`, on `device`: what a
    whole network is timed on."""
    return tuple(x.to(device) for x in at_batch(example_inputs(gm), batch))


@contextmanager
def using_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (torch's current number when None),
    and restore the number after it; yields the number used."""
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class BusyMachineWarning(UserWarning):
    """The machine was busier than its cores while fxmerge timed: timings are unreliable."""


BUSY_LOAD = 1.5  # load average per core above which timings are called unreliable


def check_load(what: str) -> float | None:
    """The 1-minute load average; a `BusyMachineWarning` when it exceeds `BUSY_LOAD` times
    the cores (timing with every core counts as a load of about the cores; more is other
    work), None where the system does not report it."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > BUSY_LOAD * cores:
        warnings.warn(f"{what}: load average {load:.1f} on {cores} cores: the machine is "
                      "busier than its cores, so these timings are unreliable; time on an "
                      "idle machine", BusyMachineWarning, stacklevel=3)
    return round(load, 2)


# ---- layers timed side by side (the latency table's harness) ---------------------------
class TimedLayer(Protocol):
    """What `time_layers` times: a layer built on demand, with what it holds in memory."""

    input_shape: tuple[int, ...]

    def module(self, device: torch.device, dtype: torch.dtype) -> nn.Module: ...
    def weight_bytes(self, dtype: torch.dtype) -> int: ...
    def output_bytes(self, dtype: torch.dtype) -> int: ...


def _group_bytes(group: list[TimedLayer], dtype: torch.dtype) -> int:
    """What a group of built layers holds: their weights, one input per input shape (the
    layers share it) and, while one runs, its output."""
    inputs = {layer.input_shape for layer in group}
    return (sum(layer.weight_bytes(dtype) for layer in group)
            + sum(math.prod(shape) for shape in inputs) * dtype.itemsize
            + max((layer.output_bytes(dtype) for layer in group), default=0))


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


def _pack(keys: list[str], layers: Mapping[str, TimedLayer], dtype: torch.dtype,
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


def _groups(layers: Mapping[str, TimedLayer], dtype: torch.dtype) -> list[list[str]]:
    """The layers in groups of at most GROUP_BYTES, each holding the ANCHORS smallest
    where there are several."""
    groups = _pack(list(layers), layers, dtype, [])
    if len(groups) == 1:
        return groups
    anchors = sorted(layers, key=lambda key: _group_bytes([layers[key]], dtype))[:ANCHORS]
    rest = [key for key in layers if key not in anchors]
    return [anchors + g for g in _pack(rest, layers, dtype, anchors)]


def time_layers(layers: Mapping[str, TimedLayer], samples: dict[str, list[Run]],
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


def _build(layer: TimedLayer, x: torch.Tensor, key: str, samples: dict[str, list[Run]],
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
