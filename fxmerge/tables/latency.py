"""Latency tables: the measured cost of every candidate merged layer, in milliseconds per
entry (measured by `fxmerge.estimate.measure_latency`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import ClassVar

from ..backends.runtimes import Backend, get_backend
from ..errors import TableError
from ..space import MergeSpace
from .base import EntryTable, TableSettings


class Check(str, Enum):
    """What a latency table's check against the whole network found."""

    OK = "ok"
    FAILED = "failed"  # `check_failure` says why

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LatencySettings(TableSettings):
    """How a latency table was timed, and what its check against the network found."""

    retired: ClassVar[frozenset[str]] = frozenset({"retimed", "unsettled"})  # medians' re-timing

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
    statistic: str = "median"  # of each layer's runs (an earlier fxmerge's)
    spread: float | None = None  # median interquartile range / median over the layers
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
