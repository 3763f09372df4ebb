"""Importance tables: how much each candidate block costs the task, as exp(score change)."""

from __future__ import annotations

from .base import EntryTable


class ImportanceTable(EntryTable):
    """`I[i, j, k, dw] = exp(score(net with only this block changed) - score(original))`.

    For LayerOnly the keys are conv names: the importance of removing that conv alone.
    """

    kind = "importance"
