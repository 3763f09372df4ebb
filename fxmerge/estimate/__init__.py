"""The estimators: what measures the tables and times whole networks, one layer above the
solvers and below the `Job`. `measure_latency` (each entry's layer, side by side),
`estimate_importance` (the paper's fine-tuned estimator), `agreement_importance` (the
output-agreement proxy), `solve_measured` and `NetworkTimer` (plans timed whole)."""

from .agreement import OutputAgreement, agreement_importance
from .importance import estimate_importance, score_plan
from .latency import LayerSpec, entry_layer, measure_latency
from .measured import NETWORK_REPEAT, Measurement, NetworkTimer, solve_measured

__all__ = ["NETWORK_REPEAT", "LayerSpec", "Measurement", "NetworkTimer", "OutputAgreement", "agreement_importance",
           "entry_layer", "estimate_importance", "measure_latency", "score_plan",
           "solve_measured"]
