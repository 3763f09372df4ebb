"""`fxmerge compress` beyond classification: a segmentation folder (images and masks, mean
IoU, torchvision's recipe) and unlabeled images (distilled, scored by output agreement);
`fxmerge.distill` and `fxmerge.agreement` from Python; their bad input."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.cli import main
from fxmerge.datasets import shapes_segmentation

SEGMENTER = """
import torch
from torch import nn


def unit(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Segmenter(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.backbone = nn.Sequential(unit(3, 16, 2), unit(16, 16), unit(16, 16), unit(16, 16))
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        y = self.classifier(self.backbone(x))
        return {"out": nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")}


def segmenter(classes=4):
    torch.manual_seed(0)
    return Segmenter(classes)
"""


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    (root / "nets.py").write_text(textwrap.dedent(SEGMENTER))
    return shapes_segmentation(root / "data", train=24, val=8), root / "nets.py"


def _compress(model: str, data, out, *extra: str) -> int:
    return main(["compress", model, "--data", str(data), "--out", str(out), "--budget", "0.9",
                 "--size", "32", "--batch", "8", "--epochs", "1", "--method", "layermerge",
                 "--budget-basis", "table", "--threads", "1", *extra])


def test_a_segmentation_folder_is_compressed_and_scored_by_mean_iou(segmentation, tmp_path,
                                                                    capsys):
    data, nets = segmentation
    assert _compress(f"{nets}:segmenter", data, tmp_path / "job", "--train-epochs", "1") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "val mIoU" in line
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["metric"] == "mIoU" and 0 <= report["accuracy_compressed"] <= 100
    assert "| mIoU (val, %) |" in (tmp_path / "job" / "report.md").read_text()


def test_masks_with_more_classes_than_the_model_are_refused(segmentation, tmp_path, capsys):
    data, nets = segmentation
    assert _compress(f"{nets}:segmenter:classes=2", data, tmp_path / "job") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the masks hold classes up to 3, but the model predicts 2" in err[0]


def test_unlabeled_images_are_distilled_and_scored_by_output_agreement(segmentation, tmp_path,
                                                                       capsys):
    data, nets = segmentation
    flat = tmp_path / "flat"
    for part in ("train", "val"):
        (flat / part).mkdir(parents=True)
        for image in (data / part / "images").iterdir():
            (flat / part / image.name).write_bytes(image.read_bytes())
    assert _compress(f"{nets}:segmenter", flat, tmp_path / "job") == 0
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["metric"] == "output agreement"
    assert report["accuracy_original"] == 100.0  # the original agrees with itself
    assert 0 < report["accuracy_compressed"] <= 100
    assert _compress(f"{nets}:segmenter", flat, tmp_path / "job2", "--train-epochs", "1") == 1
    assert "these images have none" in capsys.readouterr().err
    assert not (tmp_path / "job2").exists()


def test_distill_brings_a_compressed_network_closer_to_the_original():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = fxmerge.compress(original, torch.randn(2, 3, 16, 16), budget=0.7,
                              budget_basis="table", threads=1,
                              latency={"repeat": 5, "warmup": 1})
    batches = [torch.randn(8, 3, 16, 16) for _ in range(6)]
    before = fxmerge.agreement(result.pruned, original, batches)
    tuned = fxmerge.distill(result.pruned, original, batches, epochs=20, lr=3e-3,
                            progress=False)
    after = fxmerge.agreement(tuned, original, batches)
    assert before < after <= 1
    assert fxmerge.agreement(original, original, batches) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_the_detect_and_segment_demos_run_quick(task, tmp_path, capsys):
    assert main(["demo", "--task", task, "--quick", "--out", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "faster" in line and ("mAP50-95" in line if task == "detect" else "mIoU" in line)
    assert (tmp_path / "job" / "report.json").is_file()
