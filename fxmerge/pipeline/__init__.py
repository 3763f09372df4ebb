"""`fxmerge compress MODEL --data DIR`: the settings (`settings`), the image folder
(`data`), the job (`run`) and its report (`report`)."""

from .data import ImageData, folder_fingerprint, holdout_split, image_folder
from .run import run_job
from .settings import ImportanceMode, JobSettings

__all__ = ["ImageData", "ImportanceMode", "JobSettings", "folder_fingerprint", "holdout_split",
           "image_folder", "run_job"]
