"""The classification recipe: evaluate, the brief fine-tune, distillation, checkpoints."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxmerge
from fxmerge.demos.shared import load_digits
from fxmerge.models import DemoMobileNetV2
from fxmerge.recipes import ClassificationRecipe, distillation_loss


def loaders(seed=0):
    data = load_digits(16, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(*data.train), batch_size=64, shuffle=True, generator=gen)
    return train, DataLoader(TensorDataset(*data.val), batch_size=300)


def test_distillation_loss_is_the_standard_one():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.equal(distillation_loss(s, t, y, 4.0, 0.0), ce)
    assert distillation_loss(t, t, y, 4.0, 1.0).abs() < 1e-6  # student = teacher
    p, q = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    kl = (p * (p.log() - q)).sum(1).mean() * 4
    torch.testing.assert_close(distillation_loss(s, t, y, 2.0, 0.3), 0.7 * ce + 0.3 * kl)


@pytest.mark.slow
def test_the_recipe_trains_prunes_and_recovers_a_pruned_network(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    recipe = ClassificationRecipe(train, val, lr=3e-3, kd_weight=0.5)
    model = recipe.train(DemoMobileNetV2(), epochs=6, progress=False)
    base = recipe.evaluate(model)
    assert base > 0.8
    gm = fxmerge.trace(model, torch.randn(2, 1, 16, 16))
    space = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 1), space)
    before = recipe.evaluate(pruned)
    tuned = recipe.train(pruned, epochs=2, teacher=gm, checkpoint=tmp_path / "ft.pt",
                         progress=False)
    after = recipe.evaluate(tuned)
    assert after > before + 0.05 and after > 0.7, (base, before, after)
    assert (tmp_path / "ft.pt").is_file()
    # a finished checkpoint resumes at its end: nothing more is trained
    again = fxmerge.prune(gm, fxmerge.Plan.random(space, 1), space)
    again = recipe.train(again, epochs=2, teacher=gm, checkpoint=tmp_path / "ft.pt",
                         progress=False)
    assert recipe.evaluate(again) == after
    with pytest.raises(fxmerge.ArgumentError, match="not 1"):
        recipe.train(again, steps=1, checkpoint=tmp_path / "ft.pt")
    # what estimate_importance takes, picklable for process pools and Dask
    copy = pickle.loads(pickle.dumps(recipe))
    assert copy.evaluate(model) == base and copy.finetune is not None
    with pytest.raises(fxmerge.ArgumentError, match="kd_weight"):
        ClassificationRecipe(train, val, kd_weight=2)


def test_a_checkpoint_that_is_not_one_is_refused_by_name(tmp_path):
    train, val = loaders()
    (tmp_path / "ft.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(fxmerge.ArgumentError, match="checkpoint .*ft.pt: cannot resume"):
        ClassificationRecipe(train, val).train(DemoMobileNetV2(), steps=1,
                                               checkpoint=tmp_path / "ft.pt")


def test_an_unknown_importance_protocol_and_a_recipe_without_report_data_are_refused():
    data = DataLoader(TensorDataset(torch.randn(8, 1, 16, 16), torch.arange(8) % 2), batch_size=4)
    with pytest.raises(fxmerge.ArgumentError, match="protocol must be one of steps"):
        ClassificationRecipe(data, data, protocol="paper-mnist")
    with pytest.raises(fxmerge.ArgumentError, match="no report_data"):
        ClassificationRecipe(data, data).report(DemoMobileNetV2())


def test_the_papers_protocol_fine_tunes_on_a_subset_of_the_training_data(monkeypatch):
    data = DataLoader(TensorDataset(torch.randn(200, 1, 16, 16), torch.arange(200) % 10),
                      batch_size=4)
    recipe = ClassificationRecipe(data, data, protocol="paper-imagenet")
    seen = []
    monkeypatch.setattr(ClassificationRecipe, "train", lambda self, model, **kw: seen.append(
        (len(self.train_data.dataset), kw)) or model)
    recipe.finetune(DemoMobileNetV2())
    assert seen == [(8, {"epochs": 1.0, "progress": False})]  # 4% of 200 images, 1 epoch
