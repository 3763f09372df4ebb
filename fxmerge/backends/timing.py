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


def _glibc(function: str) -> Callable[..., int] | None:
    """glibc's `function` (`mallopt`, `malloc_trim`), or None on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), function, None)


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
    mallopt = _glibc("mallopt")
    for param, value in HELD.items() if mallopt else ():
        mallopt(param, value)
    return mallopt is not None


def give_back_memory() -> None:
    """Hand malloc's free pages back to the system (glibc), so that a finished stage's
    memory is not held through the next."""
    trim = _glibc("malloc_trim")
    if trim:
        trim(0)


@contextmanager
def steady_memory() -> Iterator[None]:
    """Run the block with freed memory held by malloc (glibc), so that what is timed is
    the computation, not page faults that come and go with the heap's layout; what it
    held is given back to the system after."""
    mallopt = _glibc("mallopt") if hold_freed_memory() else None
    try:
        yield
    finally:
        for param, value in SETTLED.items() if mallopt else ():
            mallopt(param, value)
        give_back_memory()


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
    the median of its ratios to the reference, the largest spread of its timings, and the
    `scatter` of its ratio: half the range of the preparations' ratios (how far one more
    preparation, such as the user's own, may land from the median; 0 with one)."""

    ms: float
    ratio: float
    spread: float
    scatter: float = 0.0


def within(ratio: float, scatter: float, budget: float) -> bool:
    """A measured ratio within `budget` even for a preparation at the far end of its
    scatter (docs/method.md §3b)."""
    return ratio + scatter <= budget


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
    out = {}
    for name in runs[0]:
        ratios = [r[name].ms / r[reference].ms for r in runs]
        out[name] = Relative(statistics.median(r[name].ms for r in runs),
                             statistics.median(ratios), max(r[name].spread for r in runs),
                             (max(ratios) - min(ratios)) / 2)
    return out


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

    def module(self, device: torch.device, dtype: torch.dtype,
               weights: ConstantWeights | None = None) -> nn.Module: ...
    def weight_bytes(self, dtype: torch.dtype) -> int: ...
    def output_bytes(self, dtype: torch.dtype) -> int: ...


# A timed layer's weights are a constant (their values do not change its time). Weights over
# SHARED_BYTES, bigger than a CPU's cache, so read from memory on every run whoever wrote
# them last, are views of one buffer the size of the largest: a ResNet-50 table's merged
# 5x5 to 9x9 convs hold over 1 GiB apart, about 200 MiB shared.
SHARED_BYTES = 32 << 20
WEIGHT = 1e-3


class ConstantWeights:
    """Weights of one constant value for a group of timed layers, those over `SHARED_BYTES`
    views of one buffer of `largest` elements (the group's largest weight)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, largest: int) -> None:
        self.device, self.dtype, self.largest = device, dtype, largest
        self.shared: torch.Tensor | None = None

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        if n * self.dtype.itemsize <= SHARED_BYTES:
            return torch.full(tuple(shape), WEIGHT, device=self.device, dtype=self.dtype)
        if self.shared is None:
            self.shared = torch.full((self.largest,), WEIGHT, device=self.device,
                                     dtype=self.dtype)
        return self.shared[:n].view(tuple(shape))


def _group_bytes(group: list[TimedLayer], dtype: torch.dtype) -> int:
    """What a group of built layers holds: their weights (those over SHARED_BYTES once, as
    the largest), one input per input shape (the layers share it) and, while one runs, its
    output."""
    weights = [layer.weight_bytes(dtype) for layer in group]
    inputs = {layer.input_shape for layer in group}
    return (sum(w for w in weights if w <= SHARED_BYTES)
            + max((w for w in weights if w > SHARED_BYTES), default=0)
            + sum(math.prod(shape) for shape in inputs) * dtype.itemsize
            + max((layer.output_bytes(dtype) for layer in group), default=0))


# Layers are timed side by side: every round runs each layer once, in a new random order
# (seeded by the round), so that the machine's drift reaches every layer alike and no layer
# keeps the cache its fixed neighbours leave (docs/method.md §2). A layer slower than its
# share of `seconds` runs in fewer rounds, spread evenly over them (at least
# `MIN_TIMED_RUNS`). A layer's time is the mean of its fastest tenth of runs (`fastest`):
# on a shared machine, noise only ever slows a run (another tenant, a cache left cold, a
# stretch of throttling), so the fast runs are the layer's own cost; they repeat from one
# table to the next where the median moves with the load (benchmarks/results/
# latency_stability.md). Layers are built GROUP_BYTES at a time (`_group_bytes`), each group
# timed in its own rounds; with several groups, the ANCHORS smallest layers are timed in
# every group, and `link_groups` divides out the machine's speed in each group's stretch of
# time. Memory is held steady while timing (`steady_memory`: no page faults that come and
# go with the heap).
MIN_TIMED_RUNS = 5
GROUP_BYTES = 1 << 30
ANCHORS = 5
FASTEST = 0.1


class Run(NamedTuple):
    """One timed run of a layer: the group it was built in and the round, each numbered
    across the table, and its milliseconds."""

    group: int
    round: int
    ms: float


def fastest(samples: Sequence[float]) -> float:
    """The mean of the fastest `FASTEST` of the samples (at least one)."""
    ordered = sorted(samples)
    return statistics.fmean(ordered[:max(1, int(len(ordered) * FASTEST))])


def link_groups(samples: dict[str, list[Run]]) -> dict[str, list[float]]:
    """Each layer's runs with each group's speed divided out: a group's factor is the
    median, over the layers also timed in other groups (the anchors), of their `fastest`
    there over their `fastest` overall. Milliseconds at the table's typical speed."""
    factors: dict[int, list[float]] = {}
    for s in samples.values():
        groups = {run.group for run in s}
        if len(groups) < 2:
            continue
        overall = fastest([run.ms for run in s])
        for group in groups:
            there = fastest([run.ms for run in s if run.group == group])
            factors.setdefault(group, []).append(there / overall)
    factor = {group: statistics.median(f) for group, f in factors.items()}
    return {key: [run.ms / factor.get(run.group, 1.0) for run in s]
            for key, s in samples.items()}


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
                weights = ConstantWeights(device, dtype, max(
                    layers[key].weight_bytes(dtype) // dtype.itemsize for key in groups[g]))
                inputs = {shape: torch.randn(shape, device=device, dtype=dtype)
                          for shape in dict.fromkeys(layers[key].input_shape
                                                     for key in groups[g])}
                built.update({key: _build(layers[key], inputs[layers[key].input_shape],
                                          weights, key, samples, targets, runs, backend,
                                          device, dtype, warmup, repeat, seconds)
                              for key in groups[g]})
                del inputs, weights
            for key in random.Random(round_ + n).sample(groups[g], len(groups[g])):
                if (r * runs[key]) // repeat != ((r + 1) * runs[key]) // repeat:
                    samples[key].append(Run(group + g, round_ + n, clock(built[key], device)))
            save()
        built.clear()  # before `steady_memory` gives back what it held


def _build(layer: TimedLayer, x: torch.Tensor, weights: ConstantWeights, key: str,
           samples: dict[str, list[Run]], targets: dict[str, int], runs: dict[str, int],
           backend: Backend, device: torch.device, dtype: torch.dtype, warmup: int,
           repeat: int, seconds: float) -> Callable:
    """The layer built (to run on `x`) and run once; on its first build in this timing,
    warmed up and given its number of runs (`runs`, and its target)."""
    module = layer.module(device, dtype, weights).eval()
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
