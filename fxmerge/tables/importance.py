"""Importance tables: how much each candidate change costs the task, as exp(score change)
(estimated by `fxmerge.estimate`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import EntryTable, TableSettings


@dataclass(frozen=True)
class ImportanceSettings(TableSettings):
    """How an importance table was estimated."""

    estimator: str | None = None  # "finetune", "no fine-tuning", "output agreement ..."
    base_score: float | None = None  # evaluate() of the original network
    num_keys: int | None = None
    single_convs_reinitialised: bool | None = None
    calibration_batch: int | None = None  # the output-agreement proxy's batch
    calibration_shape: list[int] | None = None  # and its (first) input's shape


class ImportanceTable(EntryTable):
    """`I[i, j, k, dw] = exp(score(net with only this block changed) - score(original))`.

    For LayerOnly the keys are conv names: the importance of removing that conv alone.
    """

    kind = "importance"
    settings_type = ImportanceSettings
