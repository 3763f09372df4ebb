"""The same plan applies to every graph form: symbolic_trace, torch.export (before and after
decompositions) and a torch.compile backend's graph."""

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm, relative_error

import fxmerge
from fxmerge.backends.compile import registered_backend

X = torch.randn(2, 3, 32, 32)
MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v2": torchvision.models.mobilenet_v2}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_plan(request):
    model = randomize_batchnorm(MODELS[request.param]())
    gm = fxmerge.trace(model, X)
    plan = fxmerge.Plan.random(fxmerge.analyze(gm), 5)
    with torch.no_grad():
        expected = fxmerge.transform(gm, plan)(X)
    return model, plan, expected


@pytest.mark.parametrize("decompose", [False, True])
def test_export_programs_give_the_same_space_and_result(model_and_plan, decompose):
    model, plan, expected = model_and_plan
    program = torch.export.export(model, (X,))
    if decompose:
        program = program.run_decompositions()
    gm = fxmerge.trace(program, X)
    space = fxmerge.analyze(gm)
    assert space.signature == plan.signature
    assert [c.name for c in space.convs] == [n for b in plan.blocks for n in b.convs]
    with torch.no_grad():
        assert relative_error(expected, fxmerge.transform(gm, plan)(X)) <= 1e-5


def test_compile_backend_eager_matches_transform(model_and_plan):
    model, plan, expected = model_and_plan
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with torch.no_grad():
        assert relative_error(expected, compiled(X)) <= 1e-5


@pytest.mark.slow
def test_registered_backend_name_with_inductor(model_and_plan):
    model, plan, expected = model_and_plan
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmerge", options={"plan": plan})
    with torch.no_grad():
        assert relative_error(expected, compiled(X)) <= 1e-4


def test_backend_refuses_a_missing_plan_and_a_foreign_one():
    with pytest.raises(fxmerge.FxMergeError, match="needs options"):
        registered_backend(None, [], {})()
    model = torchvision.models.resnet18().eval()
    other = fxmerge.trace(torchvision.models.resnet34(), X)
    plan = fxmerge.Plan.random(fxmerge.analyze(other), 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with pytest.raises(Exception, match="another graph"):
        compiled(X)
    with pytest.raises(ValueError, match="unknown backend .tvm."):
        fxmerge.backend(plan, then="tvm")


def test_backend_answers_bad_options_and_training_mode_with_one_fxmerge_error(model_and_plan):
    model, plan, _ = model_and_plan
    cases = [({"plan": '{"blocks": ['}, fxmerge.PlanError, "invalid JSON"),
             ({"plan": plan, "then": "tvm"}, fxmerge.ArgumentError, "unknown backend .tvm."),
             ({"plan": plan, "colour": 1}, fxmerge.ArgumentError, "unknown fxmerge backend")]
    for options, error, match in cases:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fxmerge", options=options)
        with pytest.raises(error, match=match), torch.no_grad():
            compiled(X)
    torch._dynamo.reset()
    compiled = torch.compile(model.train(), backend=fxmerge.backend(plan, then="eager"))
    try:
        with pytest.raises(fxmerge.MergeError, match="training mode: call model.eval"):
            compiled(X)
    finally:
        model.eval()
