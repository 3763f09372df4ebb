"""What latency and importance tables share: values per key, settings, JSON, validation."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import TableError
from ..space import Entry, MergeSpace

Key = Entry | str  # an entry (i, j, k, dw), or a conv name for LayerOnly's per-conv tables


def _key_to_json(key: Key) -> Any:
    return key if isinstance(key, str) else list(key)


def _key_from_json(raw: Any) -> Key:
    return raw if isinstance(raw, str) else Entry(int(raw[0]), int(raw[1]), int(raw[2]),
                                                  bool(raw[3]))


@dataclass
class EntryTable:
    """A number per key for one graph (its `signature`), with how it was obtained."""

    values: dict[Key, float]
    signature: str
    settings: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "table"

    def __getitem__(self, key: Key) -> float:
        try:
            return self.values[key]
        except KeyError:
            raise TableError(f"{self.kind} table has no value for {key}") from None

    def __contains__(self, key: Key) -> bool:
        return key in self.values

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def from_values(cls, space: MergeSpace, values: Mapping[Key, float], *,
                    keys: Iterable[Key] | None = None, **settings: Any):
        """A table from the user's own numbers; every key of the space is required."""
        table = cls({_normalise(k): float(v) for k, v in values.items()}, space.signature,
                    dict(settings, source=settings.get("source", "user values")))
        table.check(space, keys)
        return table

    def check_graph(self, space: MergeSpace) -> None:
        if self.signature != space.signature:
            raise TableError(f"{self.kind} table was made for another graph (signature "
                             f"{self.signature}, this graph {space.signature})")

    def check(self, space: MergeSpace, keys: Iterable[Key] | None = None) -> None:
        """Raise `TableError` for another graph's table, a missing key, or a NaN."""
        self.check_graph(space)
        for key in (space.entries if keys is None else keys):
            name = key if isinstance(key, str) else tuple(key)
            if key not in self.values:
                raise TableError(f"{self.kind} table has no value for entry {name}")
            value = self.values[key]
            if not math.isfinite(value):
                raise TableError(f"{self.kind} table value for entry {name} is {value}")

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({
            "kind": self.kind, "signature": self.signature, "settings": self.settings,
            "values": [[_key_to_json(k), v] for k, v in self.values.items()],
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        if data.get("kind") != cls.kind:
            raise TableError(f"expected a {cls.kind} table, got {data.get('kind')!r}")
        values = {_key_from_json(k): float(v) for k, v in data["values"]}
        return cls(values, data["signature"], data.get("settings", {}))


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, else only on a terminal."""
    return bool(progress) if progress is not None else os.isatty(2)


def _normalise(key: Any) -> Key:
    if isinstance(key, str):
        return key
    return Entry(int(key[0]), int(key[1]), int(key[2]), bool(key[3]))
