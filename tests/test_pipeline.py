"""`fxmerge compress MODEL --data DIR`: the whole job on an image folder, resumable, and its
fine-tuned importance entries on a local Dask cluster."""

import json

import pytest
import torch

import fxmerge
from fxmerge.cli import main
from fxmerge.demos.shared import write_digits_folder

ARGS = ["fxmerge:DemoMobileNetV2", "--grayscale", "--size", "16", "--exclude", "stem.0",
        "head.0", "--train-epochs", "6", "--epochs", "1", "--latency-batch", "8",
        "--timing-repeat", "6", "--quiet"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"), size=16)


def run(*argv):
    return main([str(a) for a in argv])


def test_compress_on_an_image_folder_end_to_end_and_resumed(digits, tmp_path, capsys):
    out = tmp_path / "job"
    assert run("compress", *ARGS, "--data", digits, "--budget", 0.7, "--out", out) == 0
    line = capsys.readouterr().out
    assert "layermerge at 70%: accuracy" in line and "10 classes" in line
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_original"] > 50 and report["accuracy_compressed"] > 30
    assert report["plan"]["measured"]["ratio"] <= 0.7 and report["timing"]["speedup"] > 0
    text = (out / "report.md").read_text()
    assert "| accuracy (val, %) |" in text and "distilling from the original" in text
    for name in ("merged.safetensors", "merged.onnx", "plan.json", "latency.json",
                 "frontier.png", "space.json"):
        assert (out / name).stat().st_size > 0, name
    merged = fxmerge.load(out / "merged.safetensors")
    x = torch.randn(3, 1, 16, 16)
    assert merged(x).shape == (3, 10)
    # a second run resumes: nothing is trained, measured or solved again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()
              if p.name in ("original-train.pt", "latency.json", "plan.json")
              or p.name.startswith("finetune-")}
    assert len(stamps) == 4
    assert run("compress", *ARGS, "--data", digits, "--budget", 0.7, "--out", out) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    again = json.loads((out / "report.json").read_text())
    assert again["accuracy_compressed"] == report["accuracy_compressed"]


def test_compress_refuses_what_it_cannot_use(digits, tmp_path, capsys):
    assert run("compress", *ARGS, "--data", tmp_path, "--budget", 0.7, "--out",
               tmp_path / "o") == 1
    assert "no 'train' folder" in capsys.readouterr().err
    assert run("compress", *ARGS, "--data", digits, "--budget", 0.7, "--out", tmp_path / "o",
               "--scheduler", "tcp://x:1") == 1
    assert "needs --importance finetune" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuned_importance_runs_on_a_local_dask_cluster(digits, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    try:
        out = tmp_path / "job"
        assert run("compress", *ARGS, "--data", digits, "--budget", 0.95, "--method",
                   "layeronly", "--importance", "finetune", "--importance-steps", 1,
                   "--scheduler", cluster.scheduler_address, "--out", out) == 0
    finally:
        cluster.close()
    table = fxmerge.ImportanceTable.from_json((out / "importance-finetune.json").read_text())
    assert table.settings.estimator == "finetune" and len(table) >= 3


def test_an_image_folder_with_other_classes_in_val_is_refused(digits, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    shutil.rmtree(data / "val" / "7")
    assert run("compress", *ARGS, "--data", data, "--budget", 0.7, "--out", tmp_path / "o") == 1
    assert "train and val have other classes" in capsys.readouterr().err
