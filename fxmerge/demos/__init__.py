"""The main jobs: end-to-end compressions on data that ships with scikit-learn.

`classify` (the default): a MobileNetV2-style classifier, scored by accuracy.
`ddpm`: a diffusion U-Net, scored by held-out loss and a Frechet distance of samples.
`compress`: `fxmerge compress` on the digits written as an image folder.
Their public names (for the benchmarks that rerun their experiments) are exported here.
"""

from .classify import (
    DemoConfig,
    Trained,
    estimator,
    finetune_importance,
    finetune_plan,
    run_demo,
    run_seed,
    spearman,
    train_seed,
)
from .ddpm import DDPMDemoConfig, Diffusion, frechet_distance, run_ddpm_demo
from .shared import (
    accuracy,
    load_digits,
    loader,
    summarize,
    time_against_original,
    write_digits_folder,
)

__all__ = ["DDPMDemoConfig", "DemoConfig", "Diffusion", "Trained", "accuracy", "estimator",
           "finetune_importance", "finetune_plan", "frechet_distance", "load_digits", "loader",
           "run_ddpm_demo", "run_demo", "run_seed", "spearman", "summarize", "time_against_original",
           "train_seed", "write_digits_folder"]
