"""The tables: plain data per key (latency in ms, importance as exp(score change)), their
settings and the key codec. Measuring them is `fxmerge.estimate`'s."""

from .base import KEY_KINDS, EntryTable, Key, KeyKind, TableSettings, register_key_kind
from .importance import ImportanceSettings, ImportanceTable
from .latency import Check, LatencySettings, LatencyTable

__all__ = ["KEY_KINDS", "Check", "EntryTable", "ImportanceSettings", "ImportanceTable", "Key",
           "KeyKind", "LatencySettings", "LatencyTable", "TableSettings", "register_key_kind"]
