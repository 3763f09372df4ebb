import pytest
import torch
from helpers import randomize_batchnorm, relative_error

import fxmerge
from fxmerge.models import DemoMobileNetV2


def test_compress_end_to_end_with_measured_latency_and_proxy_importance():
    model = randomize_batchnorm(DemoMobileNetV2())
    x = torch.randn(4, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxmerge.compress(model, x, budget=0.7, exclude=DemoMobileNetV2.EXCLUDE,
                              latency={"warmup": 1, "repeat": 3}, budget_basis="table")
    plan = result.plan
    assert plan.method == "layermerge" and plan.budget == 0.7
    assert plan.predicted_latency_ms <= 0.7 * result.latency.identity_latency(result.space)
    assert result.importance.settings.estimator == "output agreement (no fine-tuning)"
    report = result.report()
    assert "layermerge at budget 70% (table latency)" in report and not plan.measured
    assert f"{len(plan.blocks)} blocks" in report
    # ready to fine-tune: BatchNorms are still separate layers, weights are trainable
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in result.pruned.modules())
    assert all(p.requires_grad for p in result.pruned.parameters())
    merged = result.merge()
    with torch.no_grad():
        assert relative_error(result.pruned(x), merged(x)) <= 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_compress_accepts_tables_and_an_evaluate_function():
    model = randomize_batchnorm(DemoMobileNetV2())
    x = torch.randn(2, 1, 16, 16)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    latency = fxmerge.LatencyTable.from_values(space, {e: 1.0 + 0.1 * e.k for e in space.entries})
    calls = []

    def evaluate(m):
        calls.append(1)
        return 0.0

    result = fxmerge.compress(model, x, budget=0.9, latency=latency, importance=evaluate,
                              method="depth")
    assert result.plan.method == "depth"
    assert len(calls) == 1 + len(result.importance)  # the original, then every key


def test_compress_refuses_an_unreachable_budget_before_any_importance(monkeypatch):
    model = randomize_batchnorm(DemoMobileNetV2())
    x = torch.randn(2, 1, 16, 16)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    latency = fxmerge.LatencyTable.from_values(space, {e: 1.0 + 0.1 * e.k for e in space.entries})
    monkeypatch.setattr(fxmerge.job, "agreement_importance",
                        lambda *a, **k: pytest.fail("importance measured"))
    with pytest.raises(fxmerge.InfeasibleBudget, match=r"fastest plan is \d+% of the "
                       r"original's latency \(layermerge \d+%\); ask for budget 0\.\d+ or more"):
        fxmerge.compress(model, x, budget=0.01, latency=latency,
                         exclude=DemoMobileNetV2.EXCLUDE)


def test_compress_auto_keeps_the_method_whose_trained_network_scores_better():
    model = randomize_batchnorm(DemoMobileNetV2())
    x = torch.randn(2, 1, 16, 16)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    latency = fxmerge.LatencyTable.from_values(space, {e: 1.0 + 0.1 * e.k for e in space.entries})
    trained = []

    def evaluate(m):  # a network with fewer convs scores better: depth keeps every conv
        return -sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())

    def train(pruned):
        trained.append(pruned)
        return pruned

    result = fxmerge.compress(model, x, budget=0.7, latency=latency, importance=evaluate,
                              train=train, method="auto", exclude=DemoMobileNetV2.EXCLUDE,
                              budget_basis="table")
    assert set(result.candidates) == {"layermerge", "depth"} and len(trained) == 2
    scores = {m: c.score for m, c in result.candidates.items()}
    assert result.plan.method == max(scores, key=scores.get)
    assert result.pruned is result.candidates[result.plan.method].pruned
    with pytest.raises(fxmerge.ArgumentError, match="auto"):
        fxmerge.compress(model, x, budget=0.7, latency=latency, method="auto")


def test_a_job_without_a_folder_refuses_to_deploy():
    job = fxmerge.Job(DemoMobileNetV2().eval(), torch.randn(2, 1, 16, 16))
    with pytest.raises(fxmerge.ArgumentError, match="give the Job an out folder"):
        job.deploy(job.gm)
