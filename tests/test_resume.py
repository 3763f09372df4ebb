"""A job run again into one folder reuses a result only when what made it is the same:
each input changed in turn between two runs, and what was made again checked."""

import copy

import pytest
import torch

import fxmerge
from fxmerge import job as job_module
from fxmerge.models import DemoMobileNetV2

X = torch.randn(2, 1, 16, 16)
BASE = {"weights": 1.0, "data": "folder-a", "batch": 0, "levels": None, "backend": "eager",
        "budget": 0.7, "mode": "proxy"}


def _model(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = DemoMobileNetV2().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _run(out, made: list, **change) -> fxmerge.Plan:
    """One job over `out` with `BASE` as `change` amends it; `made` gets the stages that
    were computed rather than read back."""
    s = {**BASE, **change}
    job = fxmerge.Job(_model(s["weights"]), X, out=out,
                      analysis={"exclude": DemoMobileNetV2.EXCLUDE},
                      latency={"backend": s["backend"]}, inputs={"data": s["data"]})
    batch = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(s["batch"]))
    keys = fxmerge.importance_keys(job.space, ["layermerge"])
    if s["mode"] == "proxy":
        table = job.importance(keys, batch=batch)
    else:  # the paper's estimator (its scores are the fake's below)
        table = job.importance(keys, evaluate=lambda net: 0.0)
    return job.solve(table, s["budget"], basis="table", levels=s["levels"])


@pytest.fixture
def counted(monkeypatch):
    """Record each stage that computes; latency tables made from numbers, not timed (the
    backend is a setting like any other here)."""
    made = []

    def latency(space, gm, **options):
        made.append("latency")
        return fxmerge.LatencyTable.from_values(
            space, {e: 0.0 if not e.k else 1.0 + 0.1 * e.j for e in space.entries},
            backend=options.get("backend", "eager"))

    def wrap(name, fn):
        def run(*args, **kwargs):
            made.append(name)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(job_module, "measure_latency", latency)
    monkeypatch.setattr(job_module, "agreement_importance",
                        wrap("importance", job_module.agreement_importance))
    monkeypatch.setattr(job_module, "solve", wrap("plan", job_module.solve))

    def estimated(space, gm, keys, **options):
        made.append("importance")
        return fxmerge.ImportanceTable.from_values(space, dict.fromkeys(keys, 0.5), keys=keys)

    monkeypatch.setattr(job_module, "estimate_importance", estimated)
    return made


# input changed -> what is made again (the rest is read back)
CASES = {
    "nothing": ({}, set()),
    "weights": ({"weights": 1.5}, {"importance", "plan"}),
    "data": ({"data": "folder-b"}, {"importance", "plan"}),
    "calibration batch": ({"batch": 1}, {"importance", "plan"}),
    "importance mode": ({"mode": "finetune"}, {"importance", "plan"}),
    "levels": ({"levels": 500}, {"plan"}),
    "backend": ({"backend": "inductor"}, {"latency", "plan"}),
    "budget": ({"budget": 0.8}, {"plan"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_second_run_makes_again_exactly_what_the_changed_input_made(name, tmp_path,
                                                                       counted, capsys):
    change, expected = CASES[name]
    first = _run(tmp_path, counted)
    assert set(counted) == {"latency", "importance", "plan"}
    counted.clear()
    second = _run(tmp_path, counted, **change)
    assert set(counted) == expected, name
    if not expected:
        assert second == first
    for stage, file in (("latency", "latency.json"), ("importance", "importance-proxy.json")):
        recorded = (fxmerge.LatencyTable if stage == "latency" else fxmerge.ImportanceTable
                    ).from_json((tmp_path / file).read_text()).settings.made_from
        assert recorded and recorded["graph"]


def test_the_line_names_the_input_that_changed(tmp_path, counted, caplog):
    _run(tmp_path, counted)
    with caplog.at_level("INFO", logger="fxmerge.job"):
        _run(tmp_path, counted, weights=2.0)
    assert "importance-proxy.json: made from another weights; making it again" in caplog.text


def test_a_fine_tune_resumes_only_from_its_own_weights_and_data(tmp_path, counted):
    checkpoints = []

    def train(net, checkpoint):
        checkpoints.append(checkpoint)
        return net

    for weights, data in ((1.0, "a"), (1.0, "a"), (2.0, "a"), (1.0, "b")):
        job = fxmerge.Job(_model(weights), X, out=tmp_path, inputs={"data": data},
                          analysis={"exclude": DemoMobileNetV2.EXCLUDE})
        job.finetune(fxmerge.Plan.random(job.space, 0), train, {"epochs": 1})
    assert checkpoints[0] == checkpoints[1]  # the same inputs: resumed
    assert len({checkpoints[0], checkpoints[2], checkpoints[3]}) == 3


def test_a_job_s_inputs_are_fixed_once_made():
    job = fxmerge.Job(_model(1.0), X)
    with pytest.raises(fxmerge.ArgumentError, match="fixed once the job is made"):
        job.model = copy.deepcopy(job.model)
