"""`fxmerge compress MODEL --data DIR`: the settings (`settings`), the image folder
(`data`), the job (`run`) and its report (`report`)."""

from .data import (
    ImageData,
    folder_fingerprint,
    holdout_split,
    image_folder,
    is_segmentation_folder,
    is_unlabeled_folder,
    segmentation_folder,
    unlabeled_folder,
)
from .report import render, summary_line
from .run import run_job
from .settings import (
    AnalysisSettings,
    ImportanceMode,
    ImportanceStageSettings,
    JobSettings,
    LatencyStageSettings,
    SolveStageSettings,
)

__all__ = ["AnalysisSettings", "ImageData", "ImportanceMode", "ImportanceStageSettings",
           "JobSettings", "LatencyStageSettings", "SolveStageSettings", "folder_fingerprint",
           "holdout_split", "image_folder", "is_segmentation_folder", "is_unlabeled_folder", "render",
           "run_job", "segmentation_folder", "summary_line", "unlabeled_folder"]
