"""ultralytics YOLO compressed inside its DetectionModel: trained by ultralytics' own
trainer, merged exactly at any batch and size, saved, reloaded by `YOLO(path)`, exported
to ONNX and run; the CLI job; bad input refused before anything is written."""

from __future__ import annotations

import os

import pytest
import torch

from fxmerge import ArgumentError
from fxmerge.cli import main
from fxmerge.datasets import shapes_detection

yolo = pytest.importorskip("fxmerge.yolo")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return shapes_detection(root / "data", train=24, val=8)


def test_yolo_compressed_trains_in_ultralytics_merges_exactly_and_exports(shapes, tmp_path):
    from ultralytics import YOLO

    import fxmerge

    model = YOLO("yolov8n.yaml")
    detector = model.model.eval()
    result = fxmerge.compress(detector, torch.rand(1, 3, 64, 64), budget=0.85,
                              submodule=yolo.searched(detector), threads=1,
                              latency={"repeat": 5, "warmup": 1})
    assert type(result.model) is type(detector)
    layer = result.model.model[2]
    assert (layer.f, layer.i, layer.type) == (-1, 2, "ultralytics.nn.modules.block.C2f")
    model.model = result.model
    model.train(trainer=yolo.trainer_for(result.model), data=str(shapes), epochs=1,
                imgsz=64, batch=8, workers=0, plots=False, device="cpu", amp=False,
                project=str(tmp_path / "runs"), name="ft", verbose=False)
    trained = model.model.float().eval()  # reloaded by ultralytics from its best.pt
    assert any(isinstance(m, fxmerge.inside.Compressed) for m in trained.modules())
    metrics = model.val(data=str(shapes), imgsz=64, batch=8, workers=0, plots=False,
                        device="cpu", verbose=False)
    assert 0.0 <= metrics.box.map <= 1.0
    merged = fxmerge.merge(trained)
    assert type(merged) is type(detector)
    for shape in [(1, 3, 64, 64), (3, 3, 64, 96)]:
        x = torch.rand(shape)
        with torch.no_grad():
            want, got = trained(x)[0], merged(x)[0]
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-4 * want.abs().max())
    model.model = merged
    model.save(str(tmp_path / "model.pt"))
    again = YOLO(str(tmp_path / "model.pt"))
    assert len(again.predict(str(shapes.parent / "images" / "val" / "00000.png"), imgsz=64,
                             verbose=False)) == 1
    onnx = again.export(format="onnx", imgsz=64, simplify=False)
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx)
    x = np.random.rand(1, 3, 64, 64).astype(np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        ref = again.model.float().eval()(torch.from_numpy(x))[0].numpy()
    assert np.allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_a_data_yaml_whose_images_are_missing_is_refused_before_anything_is_written(
        tmp_path, capsys):
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: a\n")
    out = tmp_path / "job"
    assert main(["compress", "ultralytics:yolov8n.yaml", "--data", str(data), "--budget",
                 "0.8", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train images" in err[0] and "do not exist" in err[0]
    assert not out.exists()


def test_weights_that_do_not_exist_are_refused_not_downloaded(shapes, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["compress", "ultralytics:yolov8n.pt", "--data", str(shapes), "--budget",
                 "0.8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no such file (fxmerge downloads no weights)" in err
    assert not out.exists()


def test_a_model_that_is_not_a_detector_is_refused():
    with pytest.raises(ArgumentError, match="not an ultralytics detection model"):
        yolo.searched(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


def test_offline_keeps_ultralytics_off_the_network(shapes):
    assert os.environ["YOLO_OFFLINE"] == "1"
    settings = os.environ["YOLO_CONFIG_DIR"]
    assert os.path.exists(os.path.join(settings, "Arial.ttf"))  # no font to fetch
