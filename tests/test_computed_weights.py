"""Weights computed from parameters alone are constants at inference: the conv is folded at
capture into a plain conv with that weight, exactly; a weight computed from the input stays
a barrier."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error
from torch import nn
from torch.nn.utils import parametrize

import fxmerge
from fxmerge.capture.registry import NodeKind, kind_of

X = torch.randn(2, 4, 8, 8)


class Standardised(nn.Module):
    """A conv whose weight is standardised and scaled in the forward (a user's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.g = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.rand(8))
        self.b = nn.Parameter(torch.randn(8))
        self.after = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        w = self.w - self.w.mean(dim=(1, 2, 3), keepdim=True)
        w = w * self.g.view(-1, 1, 1, 1) / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.after(F.relu(F.conv2d(x, w, self.b * 2, padding=1)))


class InputDependent(nn.Module):
    """A conv whose weight depends on the input: not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.after = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.after(F.conv2d(x, self.w * x.mean(), padding=1))


def test_a_weight_computed_from_parameters_is_folded_into_a_plain_conv():
    model = Standardised().eval()
    gm = fxmerge.trace(model, X)
    convs = [n for n in gm.graph.nodes if kind_of(gm, n) is NodeKind.CONV]
    assert len(convs) == 2 and all(n.op == "call_module" for n in gm.graph.nodes
                                   if n.op.startswith("call") and n.target is not F.relu)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # its computation is gone
    space = fxmerge.analyze(gm)
    assert space.L == 2 and space.convs[0].kernel == 3
    with torch.no_grad():
        merged = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
        assert relative_error(model(X), merged(X)) <= 1e-6
        for seed in range(3):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed), space).eval()
            assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-5


def test_a_standardised_conv_stays_trainable_where_the_plan_keeps_it():
    """The weight keeps its computation, as a parametrization of the conv capture makes:
    where a plan keeps the conv, the pruned network trains the raw weight and the gain, as
    the model did, and the merged network folds them. The model's own parameters are not
    the pruned network's."""
    model = Standardised().eval()
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    pruned = fxmerge.prune(gm, fxmerge.Plan.identity(space), space).train()
    conv = next(m for m in pruned.modules() if parametrize.is_parametrized(m, "weight"))
    trained = dict(conv.parametrizations.weight.named_parameters())
    assert set(trained) == {"original", "0.g"}  # the raw weight and the gain
    pruned(X).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert not any(p is q for p in pruned.parameters() for q in model.parameters())
    with torch.no_grad():
        assert relative_error(model(X), pruned.eval()(X)) <= 1e-6
        assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-6


def test_a_weight_computed_from_the_input_stays_a_barrier():
    gm = fxmerge.trace(InputDependent().eval(), X)
    space = fxmerge.analyze(gm)
    assert [c.name for c in space.convs] == ["after"]
    assert any(n.target is F.conv2d or getattr(n.target, "__name__", "") == "conv2d"
               for n in gm.graph.nodes)


def test_weight_normed_convs_are_searched_and_merge_exactly():
    parametrize = nn.utils.parametrizations.weight_norm
    model = nn.Sequential(parametrize(nn.Conv2d(4, 8, 3, padding=1)), nn.ReLU(),
                          parametrize(nn.Conv2d(8, 8, 3, padding=1)),
                          parametrize(nn.Conv2d(8, 8, 1))).eval()
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    assert space.L == 3 and any(e.j - e.i > 1 for e in space.entries)
    with torch.no_grad():
        for seed in range(3):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed), space).eval()
            assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-5


def test_timm_nf_resnet_standardised_convs_are_searched_and_merge_exactly():
    timm = pytest.importorskip("timm")
    model = timm.create_model("nf_resnet26", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    assert space.L == 29 and sum(e.j - e.i > 1 for e in space.entries) > 20
    with torch.no_grad():
        assert relative_error(model(x), fxmerge.transform(
            gm, fxmerge.Plan.identity(space), space)(x)) <= 1e-5
        pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 0), space).eval()
        assert relative_error(pruned(x), fxmerge.merge(pruned)(x)) <= 1e-5
    kept = fxmerge.prune(gm, fxmerge.Plan.identity(space), space)  # convs kept alone
    standardised = [m for m in kept.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(standardised) == sum("StdConv" in type(m).__name__ for m in model.modules())
    gains = [p for m in standardised for n, p in m.named_parameters() if n.endswith("gain")]
    kept.train()(x).sum().backward()
    assert len(gains) >= space.L and all(g.grad is not None for g in gains)
