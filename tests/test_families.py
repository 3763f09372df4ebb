"""The op family registry: each family declared once, tagged at capture, read everywhere.
Adding a family is one registration: a toy one (negation, a linear op fxmerge does not know)
is registered here and the whole pipeline understands it."""

import operator

import pytest
import torch
from helpers import relative_error
from torch import nn

import fxmerge
from fxmerge import algebra
from fxmerge.capture import registry as families
from fxmerge.capture.registry import KIND_META, NodeKind, OpFamily

X = torch.randn(2, 4, 8, 8, dtype=torch.float64)


class Difference(nn.Module):
    """A 3x3 conv minus a 1x1 conv of the same input (`-x` is a negation), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + -self.b(x)))


def _negation_family() -> OpFamily:
    """`torch.neg(x)`: canonical form of `-x` and `x.neg()`; an affine map per channel."""

    def rewrite(cz, node):
        node.op, node.target = "call_function", torch.neg
        return True

    def read(reader, node, strict):
        inner = reader.read(node.args[0], strict=strict)
        ones = torch.ones(inner.out_channels, dtype=torch.float64)
        return inner and algebra.scale_shift(inner, -ones, 0 * ones)

    def refuse(gm, node):
        return "a negation not in canonical form" if node.target is operator.neg else None

    return OpFamily("negation", NodeKind.SCALE,
                    lambda gm, n: n.op == "call_function" and n.target is torch.neg,
                    {operator.neg: rewrite, "neg": rewrite}, read, refuse, "negations")


@pytest.fixture
def negation():
    family = families.register(_negation_family())
    yield family
    families.unregister(family.name)


def test_every_node_is_tagged_with_its_family_at_capture():
    gm = fxmerge.trace(Difference().double().eval(), X)
    tags = {n.name: n.meta[KIND_META] for n in gm.graph.nodes}
    assert tags["a"] == tags["b"] == tags["c"] == "conv"
    assert sorted(tags.values()).count("activation") == 1
    assert tags["neg"] == ""  # no family: a barrier
    assert families.kind_of(gm, next(n for n in gm.graph.nodes if n.name == "neg")) \
        is NodeKind.BARRIER
    assert fxmerge.reparameterize(gm).meta["fxmerge_reparameterized"] == 0


def test_one_registration_makes_a_new_op_family_understood(negation):
    model = Difference().double().eval()
    gm = fxmerge.trace(model, X)
    neg = next(n for n in gm.graph.nodes if n.meta[KIND_META] == "negation")
    assert neg.target is torch.neg  # its canonical form
    assert families.kind_of(gm, neg) is NodeKind.SCALE
    collapsed = fxmerge.reparameterize(gm)  # its affine reading: a 3x3 - 1x1 region
    convs = [n for n in collapsed.graph.nodes
             if families.kind_of(collapsed, n) is NodeKind.CONV]
    assert len(convs) == 2 and collapsed.meta["fxmerge_reparameterized"] == 1
    with torch.no_grad():
        assert relative_error(model(X), collapsed(X)) <= 1e-12
    space = fxmerge.analyze(gm)
    assert len(space.regions) == 1
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
    with torch.no_grad():
        assert relative_error(model(X), merged(X)) <= 1e-12


def test_the_invariant_of_a_family_is_checked(negation):
    gm = fxmerge.trace(Difference().double().eval(), X)
    neg = next(n for n in gm.graph.nodes if n.target is torch.neg)
    neg.target = operator.neg  # undo its canonical form
    with pytest.raises(fxmerge.TraceError, match="node 'neg' .* negation not in canonical"):
        fxmerge.check_canonical(gm)


def test_a_barrier_is_labelled_by_its_family_in_reports(negation):
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.cat([y[:, :2], -y[:, 2:]], 1))

    space = fxmerge.analyze(fxmerge.trace(Gate().double().eval(), X))
    found = fxmerge.space.reach(space)["barriers"]
    assert found == {"splits and indexing": 2, "concatenation": 1, "negations": 1}


class InPlaceResidual(nn.Module):
    """In-place ReLUs whose input is also a skip's: once prune removes conv `b`, an in-place
    ReLU would overwrite the value the skip adds."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.r1, self.r2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.r1(self.a(x))
        return self.r2(self.b(y)) + y


def test_activation_modules_are_out_of_place_in_the_canonical_graph():
    model = InPlaceResidual().double().eval()
    gm = fxmerge.trace(model, X)
    acts = [m for m in gm.modules() if isinstance(m, nn.ReLU)]
    assert acts and not any(m.inplace for m in acts)
    assert model.r1.inplace and model.r2.inplace  # the user's model is left as it is
    space = fxmerge.analyze(gm)
    removed = fxmerge.Plan.from_positions(space, [(0, 1), (1, 2)], {"a"})
    assert removed.removed_convs == ("b",)
    pruned = fxmerge.prune(gm, removed, space)
    y = torch.relu(model.a(X))
    with torch.no_grad():
        assert relative_error(pruned.eval()(X), torch.relu(y) + y) <= 1e-12
    pruned.train()(X).sum().backward()  # an in-place ReLU here failed autograd
    next(m for m in gm.modules() if isinstance(m, nn.ReLU)).inplace = True
    with pytest.raises(fxmerge.TraceError, match="in-place activation module"):
        fxmerge.check_canonical(gm)
