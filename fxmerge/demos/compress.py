"""`fxmerge demo --task compress`: the practitioner's job (`pipeline.run_job`, what
`fxmerge compress` runs) on the bundled digits written as an image folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..models import load_model
from ..models.demo import DemoMobileNetV2
from ..pipeline import JobSettings, image_folder, run_job
from .shared import write_digits_folder

SPEC = "fxmerge:DemoMobileNetV2"
SETTINGS = JobSettings(budget=0.55, grayscale=True, size=32, latency_batch=64,
                       train_epochs=12, epochs=4)
QUICK = {"train_epochs": 2, "epochs": 1, "timing_repeat": 6}


def run_compress_demo(out: str | Path = "fxmerge-compress-demo", quick: bool = False,
                      progress: bool | None = None) -> dict[str, Any]:
    """The digits as `out/digits`, compressed by the whole job into `out/job`; the
    report."""
    out = Path(out)
    settings = replace(SETTINGS, **QUICK) if quick else SETTINGS
    data = write_digits_folder(out / "digits", size=settings.size)
    changed = {k: v for k, v in vars(settings).items() if v != getattr(JobSettings(0.5), k)
               and k != "budget"}
    print(f"fxmerge compress {SPEC} --data {data} --out {out / 'job'} --budget "
          f"{settings.budget} --exclude {' '.join(DemoMobileNetV2.EXCLUDE)} "
          + " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool)
                     else f"--{k.replace('_', '-')}" for k, v in changed.items()))
    return run_job(load_model(SPEC), image_folder(data, settings), out / "job", settings,
                   spec=SPEC, analyze_options={"exclude": DemoMobileNetV2.EXCLUDE},
                   progress=progress)
