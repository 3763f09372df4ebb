"""Latency tables: the measured cost of every candidate merged layer.

Each entry `(i, j, k, dw)` is timed as the single conv it would become (channels, kernel,
stride, groups, padding `k // 2`, on the real input shape at position `i`) followed by the
network's activation at `j`. Entries that share a conv signature are timed once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture.ops import ACTIVATION_CLASSES
from ..capture.trace import ExampleInputs, as_tuple
from ..errors import TableError
from ..space import IDENTITY, Entry, MergeSpace
from .base import EntryTable, show_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvSignature:
    """Everything that decides the run time of one merged layer."""

    input_shape: tuple[int, ...]
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    activation: str | None

    @property
    def key(self) -> str:
        n, c, h, w = self.input_shape
        return (f"{n}x{c}x{h}x{w}->{self.out_channels} k{self.kernel} s{self.stride} "
                f"p{self.padding} g{self.groups} {self.activation or 'none'}")

    def module(self) -> nn.Module:
        conv = nn.Conv2d(self.input_shape[1], self.out_channels, self.kernel, self.stride,
                         self.padding, groups=self.groups)
        if self.activation is None:
            return conv
        return nn.Sequential(conv, ACTIVATION_CLASSES[self.activation]())


def entry_signature(space: MergeSpace, entry: Entry, batch_size: int | None = None
                    ) -> ConvSignature:
    """The conv signature of one table entry (its activation: `space.end_activation`)."""
    i, j, k, dw = entry
    shape = list(space.input_shape(i))
    if batch_size is not None:
        shape[0] = batch_size
    stride = 1
    for c in space.convs[i:j]:
        stride *= c.stride  # strided convs are irreducible, so always kept
    return ConvSignature(tuple(shape), space.conv(j).out_channels, k, stride, k // 2,
                         shape[1] if dw else 1, space.end_activation(i, j))


class LatencyTable(EntryTable):
    """Milliseconds per entry; `num_signatures` is how many distinct convs were timed."""

    kind = "latency"
    positive = True

    def identity_latency(self, space: MergeSpace) -> float:
        """The original network's table latency: every conv its own block."""
        self.check_graph(space)
        total = 0.0
        for c in space.convs:
            opt = space.kernel_options(c.index - 1, c.index)
            full = space.kernel_of([c.index])
            if full not in opt:
                raise TableError(f"no single-conv entry for {c.name}")
            total += self[Entry(c.index - 1, c.index, full.kernel, full.depthwise)]
        return total


# ---- timing -------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeat: int
                  ) -> float:
    """Median milliseconds of `fn()` over `repeat` runs after `warmup` runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize(device)
        samples = []
        if device.type == "cuda":
            for _ in range(repeat):
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_interleaved(nets: dict[str, Callable], x: ExampleInputs, *, repeat: int,
                     warmup: int = 3) -> dict[str, float]:
    """Median ms of each network on `x` (a tensor or a tuple of inputs), timed side by side:
    after `warmup` calls each, every round calls every network once, in turn, so drift hits
    them all alike."""
    inputs = as_tuple(x)
    with torch.inference_mode():
        for net in nets.values():
            for _ in range(warmup):
                net(*inputs)
    samples: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(repeat):
        for name, net in nets.items():
            samples[name].append(time_callable(lambda n=net: n(*inputs), inputs[0].device,
                                               warmup=0, repeat=1))
    return {name: statistics.median(s) for name, s in samples.items()}


def compile_for(module: nn.Module, backend: str, example: torch.Tensor) -> Callable:
    """`module` prepared for a latency backend: eager, compile (inductor) or tensorrt."""
    if backend == "eager":
        return module
    if backend == "compile":
        return torch.compile(module, backend="inductor")
    if backend == "tensorrt":
        try:
            import torch_tensorrt
        except ImportError as exc:
            raise TableError("the tensorrt backend needs torch-tensorrt: "
                             "pip install 'fxmerge[trt]'") from exc
        return torch_tensorrt.compile(module, inputs=[example])
    raise TableError(f"unknown latency backend {backend!r} (eager, compile, tensorrt)")


def time_signature(sig: ConvSignature, *, backend: str, device: torch.device,
                   dtype: torch.dtype, warmup: int, repeat: int) -> float:
    module = sig.module().to(device=device, dtype=dtype).eval()
    x = torch.randn(sig.input_shape, device=device, dtype=dtype)
    fn = compile_for(module, backend, x)
    return time_callable(lambda: fn(x), device, warmup=warmup, repeat=repeat)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def measure_latency(
    space: MergeSpace,
    *,
    backend: str = "eager",
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 10,
    repeat: int = 30,
    threads: int | None = None,
    cache: str | Path | None = None,
    deduplicate: bool = True,
    progress: bool | None = None,
) -> LatencyTable:
    """Time every entry of `space` as its single merged layer; identity costs nothing.

    Distinct conv signatures are timed once (`deduplicate=False` times every entry, to
    measure what that saves). With `cache`, each timing is written to that JSON file as soon
    as it is known, and a rerun with the same settings resumes where it stopped.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    settings = {
        "backend": backend, "device": str(device), "machine": machine_description(device),
        "batch_size": batch_size or space.input_shape(0)[0], "dtype": str(dtype),
        "warmup": warmup, "repeat": repeat, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "statistic": "median",
    }
    signatures = {e: entry_signature(space, e, batch_size) for e in space.entries
                  if (e.k, e.dw) != IDENTITY}
    jobs = list(dict.fromkeys(signatures.values())) if deduplicate else list(signatures)
    timings = _load_cache(cache, settings)
    todo = [job for job in jobs if _job_key(job, signatures) not in timings]
    started = time.perf_counter()
    bar = tqdm(todo, desc="latency table", unit="conv", disable=not show_progress(progress))
    for job in bar:
        sig = signatures[job] if isinstance(job, Entry) else job
        timings[_job_key(job, signatures)] = time_signature(
            sig, backend=backend, device=device, dtype=dtype, warmup=warmup, repeat=repeat)
        _save_cache(cache, settings, timings)
    values = {e: 0.0 for e in space.entries if e not in signatures}  # removing a conv
    values.update({e: timings[_job_key(sig if deduplicate else e, signatures)]
                   for e, sig in signatures.items()})
    settings.update(num_entries=len(values), num_signatures=len(set(signatures.values())),
                    num_timed=len(jobs), seconds=round(time.perf_counter() - started, 3))
    log.info("latency table: %d entries, %d distinct signatures", len(values),
             settings["num_signatures"])
    return LatencyTable(values, space.signature, settings)


def _job_key(job: ConvSignature | Entry, signatures: dict) -> str:
    return job.key if isinstance(job, ConvSignature) else f"entry {tuple(job)} {signatures[job].key}"


def _load_cache(cache: str | Path | None, settings: dict) -> dict[str, float]:
    if cache is None or not Path(cache).is_file():
        return {}
    data = json.loads(Path(cache).read_text())
    keep = {k: v for k, v in settings.items() if k != "threads"}
    if {k: data["settings"].get(k) for k in keep} != keep:
        log.warning("latency cache %s has other settings; ignoring it", cache)
        return {}
    return dict(data["timings"])


def _save_cache(cache: str | Path | None, settings: dict, timings: dict) -> None:
    if cache is None:
        return
    path = Path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "timings": timings}, indent=1))
    tmp.replace(path)

