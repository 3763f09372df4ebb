"""Compressing inside the user's model (`compress(..., submodule=)`): the model's class,
modules and attributes kept, the pruned submodules put back, merged exactly at any batch and
size, a saved plan re-applied to a fresh model, and the refusals."""

from __future__ import annotations

import copy
import importlib
import pickle
from collections import OrderedDict

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm, relative_error
from torch import nn

import fxmerge
from fxmerge import ArgumentError, Plan, TraceError
from fxmerge.inside import Compressed, compressed


def unit(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Backbone(nn.Module):
    """Returns a dict, as torchvision's segmentation backbones do."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(unit(3, 16, stride=2), unit(16, 16), unit(16, 16))
        self.deep = nn.Sequential(unit(16, 32, stride=2), unit(32, 32), unit(32, 32))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.stem(x)
        return OrderedDict(out=self.deep(low), aux=low)


class Segmenter(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.classifier = nn.Conv2d(32, classes, 1)
        self.aux_classifier = nn.Conv2d(16, classes, 1)
        self.classes = classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        size = x.shape[-2:]
        up = nn.functional.interpolate
        return {"out": up(self.classifier(f["out"]), size=size, mode="bilinear"),
                "aux": up(self.aux_classifier(f["aux"]), size=size, mode="bilinear")}


def _compress(model: nn.Module, x: torch.Tensor, budget: float = 0.7, **kw
              ) -> fxmerge.CompressResult:
    return fxmerge.compress(model, x, budget=budget, budget_basis="table", threads=1,
                            latency={"repeat": 5, "warmup": 1}, **kw)


@pytest.fixture(scope="module")
def segmenter_result():
    torch.manual_seed(0)
    model = randomize_batchnorm(Segmenter()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compress(model, torch.randn(2, 3, 32, 32), budget=0.85, submodule="backbone")
    return model, before, result


def test_the_users_model_comes_back_with_its_class_and_other_modules(segmenter_result):
    model, before, result = segmenter_result
    out = result.model
    assert type(out) is Segmenter and out.classes == 3
    assert set(compressed(out)) == {"backbone"}
    assert isinstance(out.backbone, Compressed)
    assert isinstance(out.backbone.net, torch.fx.GraphModule)
    assert out.classifier is not model.classifier  # a copy ...
    assert torch.equal(out.classifier.weight, model.classifier.weight)  # ... of the same
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # unchanged
    assert not compressed(model)
    assert result.plan.submodules["backbone"][0]["shape"] == [2, 3, 32, 32]
    assert result.plan.removed_convs or result.plan.removed_activations(result.space)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (5, 3, 48, 40)])
def test_merged_model_equals_pruned_model_at_any_batch_and_size(segmenter_result, shape):
    _, _, result = segmenter_result
    pruned = result.model.eval()
    merged = fxmerge.merge(pruned)
    assert type(merged) is Segmenter
    assert all(m.merged for m in compressed(merged).values())
    x = torch.randn(shape)
    with torch.no_grad():
        want, got = pruned(x), merged(x)
    assert got["out"].shape == (shape[0], 3, *shape[2:])
    for key in ("out", "aux"):
        assert relative_error(want[key], got[key]) < 1e-5


def test_a_saved_plan_reapplied_to_a_fresh_model_takes_the_trained_weights(segmenter_result,
                                                                             tmp_path):
    _, _, result = segmenter_result
    trained = result.model.train()
    with torch.no_grad():  # "fine-tuning": every weight moved
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "plan.json"
    path.write_text(result.plan.to_json())
    fresh = fxmerge.apply(Segmenter(), Plan.from_json(path.read_text()))
    fresh.load_state_dict(trained.state_dict())  # strict: the same names and shapes
    x = torch.randn(3, 3, 40, 32)
    with torch.no_grad():
        assert relative_error(trained.eval()(x)["out"], fresh.eval()(x)["out"]) < 1e-6


def test_the_compressed_model_trains_and_survives_deepcopy_and_pickle(segmenter_result,
                                                                      tmp_path):
    import copy

    _, _, result = segmenter_result
    model = copy.deepcopy(result.model).train()
    assert compressed(model)  # the marks survive a deepcopy (an EMA, a trainer)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(torch.randn(4, 3, 32, 32))["out"].square().mean()
    loss.backward()
    opt.step()
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert set(compressed(again)) == {"backbone"}
    x = torch.randn(2, 3, 36, 28)
    with torch.no_grad():
        merged = fxmerge.merge(again.eval())
        assert relative_error(again(x)["out"], merged(x)["out"]) < 1e-5


def test_torchvision_deeplab_backbone_compressed_inside():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    model = randomize_batchnorm(model).eval()
    with pytest.raises(fxmerge.InfeasibleBudget, match=r"submodules take \d+% of the model"):
        _compress(model, torch.randn(2, 3, 64, 64), budget=0.3, submodule="backbone")
    result = _compress(model, torch.randn(2, 3, 64, 64), budget=0.9, submodule="backbone")
    assert type(result.model) is type(model)
    merged = fxmerge.merge(result.model.eval())
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        want, got = result.model(x), merged(x)
    assert relative_error(want["out"], got["out"]) < 1e-4
    assert relative_error(want["aux"], got["aux"]) < 1e-4


def test_a_submodule_that_does_not_exist_is_refused_with_the_close_names():
    with pytest.raises(ArgumentError, match=r"submodule 'backbon'.*did you mean backbone"):
        _compress(Segmenter(), torch.randn(1, 3, 32, 32), submodule="backbon")


def test_a_submodule_the_model_never_calls_is_refused():
    model = Segmenter()
    model.unused = unit(3, 3)
    with pytest.raises(TraceError, match=r"submodule 'unused' is never called"):
        _compress(model, torch.randn(1, 3, 32, 32), submodule=["backbone", "unused"])


def test_a_predicate_that_picks_nothing_is_refused():
    with pytest.raises(ArgumentError, match="picks no submodule"):
        _compress(Segmenter(), torch.randn(1, 3, 32, 32), submodule=lambda name, m: False)


def test_apply_refuses_a_plan_for_another_model(segmenter_result):
    _, _, result = segmenter_result
    with pytest.raises(fxmerge.PlanError, match="no submodule 'backbone'"):
        fxmerge.apply(nn.Sequential(unit(3, 8)), result.plan)


def _model_ratios(monkeypatch, ratios: list[float]) -> list[float]:
    """The whole model's measured ratios `side_by_side` reports, in turn (the solves
    themselves on the table, so that no network is timed); returns the submodules'
    budgets each solve was given."""
    asked: list[float] = []
    solve = fxmerge.Job.solve

    def on_table(self, table, budget=None, **kw):
        asked.append(budget)
        return solve(self, table, budget, **{**kw, "basis": "table"})

    monkeypatch.setattr(fxmerge.Job, "solve", on_table)
    given = iter(ratios)
    monkeypatch.setattr(importlib.import_module("fxmerge.compress"), "side_by_side", lambda *a, **k: {
        "merged": fxmerge.backends.timing.Relative(1.0, next(given), 0.0)})
    return asked


def test_the_whole_models_measured_budget_narrows_the_submodules_until_it_holds(monkeypatch):
    asked = _model_ratios(monkeypatch, [0.95, 0.8])
    torch.manual_seed(0)
    result = fxmerge.compress(Segmenter().eval(), torch.randn(1, 3, 32, 32), budget=0.85,
                              submodule="backbone", threads=1,
                              latency={"repeat": 5, "warmup": 1})
    assert len(asked) == 2 and asked[1] < asked[0]
    assert result.plan.extra["model_ratio"] == 0.8


def test_a_whole_model_that_never_measures_within_the_budget_is_refused(monkeypatch):
    """Never a model over its budget handed back as if it held (the plan tried comes with
    the error, marked over budget)."""
    _model_ratios(monkeypatch, [0.95] * 3)
    torch.manual_seed(0)
    with pytest.raises(fxmerge.InfeasibleBudget, match="measured within 85.0%.*95.0% ± 0.0%") as e:
        fxmerge.compress(Segmenter().eval(), torch.randn(1, 3, 32, 32), budget=0.85,
                         submodule="backbone", threads=1, latency={"repeat": 5, "warmup": 1})
    assert e.value.plan.extra["over_budget"] and e.value.plan.extra["model_ratio"] == 0.95


class StridedBackbone(Backbone):
    """Its stride a property of its class, as segmentation_models_pytorch's encoders have
    (`output_stride`), which the model reads in its forward."""

    @property
    def output_stride(self) -> int:
        return 4


class CheckedSegmenter(Segmenter):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = StridedBackbone()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] % self.backbone.output_stride:
            raise ValueError("the input's size must divide by the backbone's stride")
        return super().forward(x)


def test_a_property_the_model_reads_off_a_compressed_submodule_is_kept():
    torch.manual_seed(0)
    model = randomize_batchnorm(CheckedSegmenter()).eval()
    result = _compress(model, torch.randn(1, 3, 32, 32), budget=0.85, submodule="backbone")
    assert isinstance(result.model.backbone, Compressed)
    assert result.model.backbone.output_stride == 4
    x = torch.randn(2, 3, 48, 48)
    merged = fxmerge.merge(copy.deepcopy(result.model).eval())
    for net in (merged, pickle.loads(pickle.dumps(result.model)).eval()):
        assert net.backbone.output_stride == 4
        with torch.no_grad():
            assert relative_error(result.model.eval()(x)["out"], net(x)["out"]) < 1e-5
