"""Timing: robust statistics, side-by-side (interleaved) runs, the inputs a whole network is
timed on. What a network runs on is `runtimes.prepare`'s."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..capture.trace import ExampleInputs, as_tuple, example_inputs
from ..errors import ArgumentError

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


@contextmanager
def steady_memory() -> Iterator[None]:
    """Run the block with freed memory held by malloc (glibc), so that what is timed is
    the computation, not page faults that come and go with the heap's layout."""
    mallopt = _mallopt()
    for param, value in HELD.items() if mallopt else ():
        mallopt(param, value)
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
                     warmup: int = 3) -> dict[str, Timing]:
    """Each network on `x` (a tensor or a tuple of inputs), timed side by side: after
    `warmup` calls each, every round calls every network once, in turn, the order reversed
    every other round, so drift, load and the place in the round hit them all alike."""
    inputs = as_tuple(x)
    device = inputs[0].device
    samples: dict[str, list[float]] = {name: [] for name in nets}
    order = list(nets)
    with torch.inference_mode(), steady_memory():
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
                           reference: str = "original") -> dict[str, Relative]:
    """`make()` prepares the networks afresh (a network prepared again can run several
    percent faster or slower on a CPU); each of `preparations` sets is timed side by side
    for `repeat / preparations` interleaved rounds (at least one)."""
    rounds = -(-repeat // preparations)
    runs = [time_interleaved(make(), x, repeat=rounds, warmup=warmup)
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
