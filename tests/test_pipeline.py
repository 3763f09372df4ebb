"""`fxmerge compress MODEL --data DIR`: the whole job on an image folder, resumable, and its
fine-tuned importance entries on a local Dask cluster."""

import copy
import json
import shutil
import traceback

import pytest
import torch
from torch.utils.data import DataLoader

import fxmerge
from fxmerge.cli import main
from fxmerge.demos import write_digits_folder
from fxmerge.models import DemoMobileNetV2
from fxmerge.pipeline import JobSettings, holdout_split, image_folder, run_job

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
    report = json.loads((out / "report.json").read_text())
    chosen = report["choice"]["method"]
    assert f"{chosen} at 70%: val accuracy" in line and "on the held-out data" in line
    assert set(report["candidates"]) | set(report.get("dropped", {})) == {"layermerge", "depth"}
    assert report["accuracy_original"] > 50 and report["accuracy_compressed"] > 30
    assert report["plan"]["measured"]["ratio"] <= 0.7 and report["timing"]["speedup"] > 0
    text = (out / "report.md").read_text()
    assert "| accuracy (val, %) |" in text and "distilling from the original" in text
    assert "images held out of train/" in text and "val/ (" in text
    for name in ("merged.safetensors", "merged.onnx", "plan.json", "latency.json",
                 "frontier.png", "space.json"):
        assert (out / name).stat().st_size > 0, name
    merged = fxmerge.load(out / "merged.safetensors")
    x = torch.randn(3, 1, 16, 16)
    assert merged(x).shape == (3, 10)
    # a second run resumes: nothing is trained, measured or solved again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()
              if p.name in ("latency.json", "plan.json")
              or p.name.startswith(("finetune-", "original-train-"))}
    assert len(stamps) == 3 + len(report["candidates"])
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
    assert run("compress", *ARGS, "--data", digits, "--budget", 0.7, "--out", tmp_path / "o",
               "--holdout", 1.0) == 1
    assert "holdout must be a fraction in (0, 1), got 1.0" in capsys.readouterr().err
    with pytest.raises(fxmerge.ArgumentError, match="importance_protocol must be one of"):
        JobSettings(budget=0.5, importance_protocol="paper-mnist")
    with pytest.raises(fxmerge.ArgumentError, match="budget_basis must be one of"):
        JobSettings(budget=0.5, budget_basis="wall")


def test_the_held_out_split_is_stratified_with_a_floor_and_seeded():
    labels = [0] * 100 + [1] * 20 + [2] * 6
    fit, held = holdout_split(labels, 0.1, seed=0)
    per_class = [sum(labels[i] == c for i in held) for c in range(3)]
    assert per_class == [10, 5, 3]  # 10%; the floor of 5; at most half of a class
    assert sorted(fit + held) == list(range(len(labels))) and not set(fit) & set(held)
    assert holdout_split(labels, 0.1, seed=0) == (fit, held)
    assert holdout_split(labels, 0.1, seed=1) != (fit, held)


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


class WatchedLoader(DataLoader):
    """A loader that records which functions were running whenever it is read."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader.dataset, batch_size=loader.batch_size)
        self.readers: list[set[str]] = []

    def __iter__(self):
        self.readers.append({frame.name for frame in traceback.extract_stack()})
        return super().__iter__()


def test_val_is_read_only_for_the_report_and_never_chooses(digits, tmp_path):
    """Importance, solves and the choice read the held-out part of train/; two jobs whose
    val/ folders differ write the same importance table and plan (table-basis budget)."""
    settings = JobSettings(budget=0.8, method="layermerge", grayscale=True, size=16,
                           epochs=0.2, latency_batch=8, timing_repeat=4, budget_basis="table")
    other = tmp_path / "other"
    shutil.copytree(digits, other)
    for image in sorted((other / "val").rglob("*.png"))[::2]:  # another val/: half replaced
        image.write_bytes(next((other / "train" / image.parent.name).glob("*.png")).read_bytes())
    model = DemoMobileNetV2().eval()
    runs = []
    for root in (digits, other):
        data = image_folder(root, settings)
        data.val = WatchedLoader(data.val)
        out = tmp_path / f"job-{root.name}"
        if runs:  # the same latency table: the plans then depend on importance alone
            out.mkdir()
            shutil.copy(runs[0][1] / "latency.json", out / "latency.json")
        with pytest.warns(UserWarning, match="near chance"):  # random weights
            report = run_job(copy.deepcopy(model), data, out, settings, analyze_options={
                "exclude": ["stem.0", "head.0"]}, progress=False)
        runs.append((report, out, data.val.readers))
    for report, out, readers in runs:
        assert len(readers) == 1 + len(report["candidates"])  # the original and each one
        assert all("report" in r for r in readers)  # `recipe.report`, only
        assert not any(r & {"evaluate", "finetune", "_importance", "_candidate", "train"}
                       for r in readers)
        assert "teacher_warning" in report and report["images"]["holdout"] >= 50
    (a, out_a, _), (b, out_b, _) = runs
    for name in ("importance-proxy.json", "plan.json"):
        assert (out_a / name).read_text() == (out_b / name).read_text(), name
    assert a["choice"] == b["choice"] and a["candidates"].keys() == b["candidates"].keys()


def test_an_unreachable_budget_is_refused_after_the_latency_table(digits, tmp_path, capsys):
    out = tmp_path / "job"
    assert run("compress", *ARGS, "--data", digits, "--budget", 0.05, "--out", out) == 1
    err = capsys.readouterr().err
    assert "below what the latency table allows" in err and "ask for --budget" in err
    assert (out / "latency.json").exists()
    assert not list(out.glob("importance-*")) and not list(out.glob("finetune-*"))


@pytest.mark.slow
def test_a_second_run_with_other_weights_makes_its_own_results(digits, tmp_path, capsys):
    """The new user's try: the same job into one folder with --weights w1.pt, then w2.pt
    (every weight scaled): importance, plans and fine-tunes are made again, and the summary
    line's speed-up is the second run's own."""
    torch.manual_seed(0)
    model = DemoMobileNetV2()
    torch.save(model.state_dict(), tmp_path / "w1.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.save(model.state_dict(), tmp_path / "w2.pt")
    out = tmp_path / "job"
    args = [a for a in ARGS if a != "--quiet"]
    args[args.index("--train-epochs") + 1] = "1"
    files = {}
    for weights in ("w1.pt", "w2.pt"):
        assert run("compress", *args, "--data", digits, "--budget", 0.7, "--out", out,
                   "--method", "layermerge", "--weights", tmp_path / weights) == 0
        printed = capsys.readouterr().out
        files[weights] = {n: (out / n).read_text() for n in ("importance-proxy.json",
                                                              "plan.json")}
        report = json.loads((out / "report.json").read_text())
        t = report["timing"]
        assert f"{t['speedup']:.2f}x faster ({t['original_ms']:.4g} -> {t['merged_ms']:.4g} ms" \
            in printed
    assert "importance-proxy.json: made from another weights; making it again" in printed
    for name in ("importance-proxy.json", "plan.json"):
        assert files["w1.pt"][name] != files["w2.pt"][name], name
    assert len(list(out.glob("finetune-*.pt"))) == 2  # one per weights
    assert len(list(out.glob("original-train-*.pt"))) == 2
