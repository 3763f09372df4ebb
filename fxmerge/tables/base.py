"""What latency and importance tables share: values per key, settings, JSON, validation.

A table holds plain data. Its keys are whatever the methods score (`solve.Method`): the
space's entries, Depth's keys, conv names; each kind of key is registered here once with
its JSON form (`register_key_kind`), so a method with a key of its own adds its kind
without editing the tables."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..errors import ArgumentError, TableError
from ..sides import compact
from ..space import IDENTITY, DepthKey, Entry, MergeSpace

Key = Hashable  # an `Entry`, a `DepthKey`, a conv name, or a registered method's own kind


@dataclass(frozen=True)
class KeyKind:
    """One kind of table key: its type, whether a JSON value is of this kind (`accepts`),
    and the JSON form both ways (`decode` raises `TableError` for a malformed value)."""

    type: type
    accepts: Callable[[Any], bool]
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


KEY_KINDS: dict[type, KeyKind] = {}


def register_key_kind(kind: KeyKind) -> KeyKind:
    """Add a kind of table key (a method's own); kinds are tried in order when read."""
    KEY_KINDS[kind.type] = kind
    return kind


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_from_json(raw: Any) -> Entry:
    """`[i, j, k, dw]`, `k` an int or one per axis."""
    k = raw[2] if len(raw) == 4 else None
    sides = isinstance(k, (list, tuple)) and bool(k) and all(map(_count, k))  # one per axis
    if k is None or not (_count(raw[0]) and _count(raw[1]) and (_count(k) or sides)) \
            or not isinstance(raw[3], (bool, int)):
        raise TableError(f"table key {raw!r:.40} is neither a conv name nor [i, j, k, dw]")
    return Entry(raw[0], raw[1], compact(k) if sides else k, bool(raw[3]))


def _depth_key_from_json(raw: dict) -> DepthKey:
    block, start, end = (raw.get(k) for k in ("block", "start_activation", "end_activation"))
    if (set(raw) != {"block", "start_activation", "end_activation"}
            or not isinstance(block, list) or len(block) != 2
            or not all(_count(v) for v in block)
            or not isinstance(start, bool) or not isinstance(end, bool)):
        raise TableError(f"table key {raw!r:.60} is not a Depth key {{'block': [i, j], "
                         "'start_activation': bool, 'end_activation': bool}")
    return DepthKey(block[0], block[1], start, end)


# the space's own keys: conv names (LayerOnly's removal of one), entries, Depth's keys
register_key_kind(KeyKind(str, lambda raw: isinstance(raw, str), lambda key: key, str))
register_key_kind(KeyKind(Entry, lambda raw: isinstance(raw, (list, tuple)), list,
                          lambda raw: _entry_from_json(list(raw))))
register_key_kind(KeyKind(
    DepthKey, lambda raw: isinstance(raw, dict) and "block" in raw,
    lambda key: {"block": [key.i, key.j], "start_activation": key.start,
                 "end_activation": key.end}, _depth_key_from_json))


def key_to_json(key: Key) -> Any:
    """A key's JSON form, by its registered kind."""
    kind = KEY_KINDS.get(type(key))
    if kind is None:
        raise TableError(f"table key {key!r:.40} is of no registered kind "
                         f"({', '.join(k.__name__ for k in KEY_KINDS)})")
    return kind.encode(key)


def key_from_json(raw: Any) -> Key:
    """A key from its JSON form (TableError for anything no registered kind accepts)."""
    for kind in KEY_KINDS.values():
        if kind.accepts(raw):
            return kind.decode(raw)
    raise TableError(f"table key {raw!r:.40} is neither a conv name nor [i, j, k, dw]")


MAX_VALUE = 1e9  # beyond this a value is a unit error or garbage, never a measurement


@dataclass(frozen=True)
class TableSettings:
    """How a table was obtained: a typed record, the same fields in memory and in JSON
    (fields left unset are not written)."""

    source: str = "measured"  # or "user values" (`from_values`)
    # what made it, part by part (a `Job`'s fingerprints: graph, weights, data, settings)
    made_from: dict[str, str] | None = None

    # settings an earlier fxmerge wrote that no longer mean anything: read and dropped
    retired: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], what: str = "table"):
        """Settings from JSON; a `TableError` names any field this kind of table has not."""
        raw = {k: v for k, v in raw.items() if k not in cls.retired}
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise TableError(f"{what}: unknown setting(s) {', '.join(map(repr, unknown))} "
                             f"(a {cls.__name__} has {', '.join(f.name for f in fields(cls))})")
        return cls(**raw)


@dataclass
class EntryTable:
    """A number per key for one graph (its `signature`), with how it was obtained."""

    values: dict[Key, float]
    signature: str
    settings: TableSettings | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()  # the space's, batch aside

    kind: ClassVar[str] = "table"
    positive: ClassVar[bool] = False  # latencies must be > 0
    settings_type: ClassVar[type[TableSettings]] = TableSettings

    def __post_init__(self) -> None:
        self.values = {key: self._check_value(key, v) for key, v in self.values.items()}
        if self.settings is None:
            self.settings = self.settings_type()
        elif isinstance(self.settings, Mapping):
            self.settings = self.settings_type.from_dict(self.settings, f"{self.kind} table")

    @classmethod
    def _check_value(cls, key: Key, value: Any) -> float:
        """`value` as a float, or `TableError` when it cannot be one of this table's."""
        name = key_name(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TableError(f"{cls.kind} table value for {name} is {value!r:.40}, not a number")
        if not math.isfinite(value) or abs(value) > MAX_VALUE:
            raise TableError(f"{cls.kind} table value for {name} is {value}: values must be "
                             f"finite and at most {MAX_VALUE:g} in size")
        removal = isinstance(key, Entry) and (key.k, key.dw) == IDENTITY and value == 0
        if cls.positive and value <= 0 and not removal:
            raise TableError(f"{cls.kind} table value for {name} is {value}: it must be > 0 "
                             "(0 only for an entry that removes its conv)")
        return float(value)

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
        """A table from the user's own numbers; every key of the space is required.
        `settings` are fields of the table's settings type (`source` is "user values")."""
        try:
            typed = cls.settings_type(**{"source": "user values", **settings})
        except ArgumentError:  # a setting's own check (an unknown backend)
            raise
        except TypeError as exc:
            raise ArgumentError(f"{cls.kind} table settings: {exc}") from None
        table = cls({_normalise(k): v for k, v in values.items()}, space.signature, typed,
                    space.input_shapes)
        table.check(space, keys)
        return table

    def check_graph(self, space: MergeSpace) -> None:
        if self.signature == space.signature:
            return
        if self.input_shapes and tuple(self.input_shapes) != space.input_shapes:
            why = (f"the input shape differs (the table's {list(self.input_shapes)}, this "
                   f"graph's {list(space.input_shapes)}, batch aside)")
        else:
            why = ("another model, or the same one analysed with other settings (stride_rule, "
                   "exclude, add_activations, max_kernel_bytes)")
        raise TableError(f"{self.kind} table was made for another graph (signature "
                         f"{self.signature}, this graph {space.signature}): {why}; measure it "
                         "again on this graph")

    def check(self, space: MergeSpace, keys: Iterable[Key] | None = None) -> None:
        """Raise `TableError` for another graph's table or a missing key (values were
        checked when the table was made)."""
        self.check_graph(space)
        for key in (space.entries if keys is None else keys):
            if key not in self.values:
                raise TableError(f"{self.kind} table has no value for entry {key_name(key)}")

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({
            "kind": self.kind, "signature": self.signature,
            "input_shapes": [list(shape) for shape in self.input_shapes],
            "settings": self.settings.to_dict(),
            "values": [[key_to_json(k), v] for k, v in self.values.items()],
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str):
        """Parse a table; anything but a well-formed table raises `TableError` saying what."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TableError(f"not a {cls.kind} table: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise TableError(f"expected a {cls.kind} table, got {kind!r}")
        rows, signature = data.get("values"), data.get("signature")
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2
                                                 for r in rows):
            raise TableError(f"{cls.kind} table: 'values' must be a list of [key, value] pairs")
        if not isinstance(signature, str):
            raise TableError(f"{cls.kind} table: 'signature' must be a string")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise TableError(f"{cls.kind} table: 'settings' must be an object")
        shapes = data.get("input_shapes", [])
        if not isinstance(shapes, list) or not all(
                isinstance(s, list) and all(type(d) is int for d in s) for s in shapes):
            raise TableError(f"{cls.kind} table: 'input_shapes' must be a list of shapes")
        return cls({key_from_json(k): v for k, v in rows}, signature,
                   cls.settings_type.from_dict(settings, f"{cls.kind} table"),
                   tuple(tuple(s) for s in shapes))


def key_name(key: Key) -> Any:
    """How an error message names a key."""
    return tuple(key) if isinstance(key, Entry) else key


def _normalise(key: Any) -> Key:
    """A key as given by a user (an entry may come as a plain tuple)."""
    if type(key) in KEY_KINDS:
        return key
    try:
        return key_from_json(list(key))
    except TypeError:
        raise TableError(f"table key {key!r:.40} is neither a conv name nor (i, j, k, dw)"
                         ) from None
