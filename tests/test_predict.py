"""Registered models: a checkpoint into the MLflow registry and back out of ``models:/`` URIs
(the ``best`` aliases, versions, run ids, one cached copy each), ``jobs/predict.py`` on a
synthetic video, the preprocessing that travels with a model, the pyfunc flavour. No Ray, no
training: a randomly initialised small network is enough to check ranking and the round trip."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stm.config import embedded_default, to_dict
from stm.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic

from tiny import own_lines  # tests/tiny.py

ROOT = Path(__file__).resolve().parents[1]
MODEL = "stm-predict-test"


SCORES = (0.4, 0.7, 0.5)  # three runs' scores: version 2 is the best


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """Three registered versions of one random small model (three runs of one dataset and
    split), a synthetic video, the store URI."""
    from stm.model import build_model
    from stm.train import tracking
    from stm.train.registry import log_model, register_run

    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    data = tmp / "data"  # what a preprocessed dataset says about itself
    data.mkdir()
    (data / "classes.json").write_text(json.dumps(list(SYNTHETIC_CLASSES)))
    (data / "dataset.json").write_text(
        json.dumps({"source": "synthetic", "flow": "dis", "short_side": None, "jpeg_quality": 90})
    )
    cfg = embedded_default(data=str(data), crop_size=48, test_frames=3, name="predict-test")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    state = {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1, "metrics": {}}
    torch.save({**state, "class_names": list(SYNTHETIC_CLASSES)}, ckpt / "checkpoint.pt")
    runs, versions = [], []
    for score in SCORES:
        run_id = tracking.start_run(uri, "stm", "predict-test", to_dict(cfg), {"kind": "test"})
        log_model(uri, run_id, ckpt)
        versions.append(register_run(uri, run_id, MODEL, score=score, data=str(data), split=1))
        tracking.end_run(uri, run_id)
        runs.append(run_id)
    videos = Path(generate_synthetic(str(tmp / "videos"), num_videos=6, num_frames=12))
    return {
        "uri": uri,
        "run_id": runs[0],
        "runs": runs,
        "versions": versions,
        "checkpoint": ckpt,
        "video": str(next(videos.glob("*_up/*.avi"))),
        "tmp": tmp,
    }


def _predict(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "predict.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_job_uses_the_best_version_by_default_and_prints_a_ranked_top5(registered):
    alias = "best-data-split1"  # the dataset folder "data", split 1
    assert registered["versions"] == [(1, alias), (2, alias), (3, alias)]
    proc = _predict(  # no --model: models:/stm@best, here --model models:/MODEL@best
        [
            registered["video"],
            "--model",
            f"models:/{MODEL}@best",
            "--mlflow-uri",
            registered["uri"],
        ],
        registered["tmp"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert f"{MODEL} version 2" in lines[0]  # the highest score, not the newest version
    ranked = [ln.split() for ln in lines[1:]]
    assert [r[0] for r in ranked] == ["1.", "2.", "3.", "4.", "5."]
    names = [r[1] for r in ranked]
    scores = [float(r[2]) for r in ranked]
    assert set(names) <= set(SYNTHETIC_CLASSES) and len(set(names)) == 5
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-3
    latest = _predict(
        [registered["video"], "--model", f"models:/{MODEL}/latest"]
        + ["--mlflow-uri", registered["uri"]],
        registered["tmp"],
    )
    assert f"{MODEL} version 3" in latest.stdout.splitlines()[0]  # "latest": the newest


def test_versions_carry_score_dataset_and_split_and_the_aliases_follow_the_best(registered):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registered["uri"])
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    for number, score in enumerate(SCORES, start=1):
        tags = versions[number].tags
        assert float(tags["score"]) == score and tags["dataset"] == "data"
        assert tags["split"] == "1" and tags["stage"] == "fused"
        assert versions[number].source.endswith("/model")  # the run's own model, no copy
    for alias in ("best", "best-data-split1"):
        assert str(client.get_model_version_by_alias(MODEL, alias).version) == "2"
    mv = client.get_model_version(MODEL, "2")
    from urllib.parse import urlparse

    from mlflow.models import Model

    info = Model.load(urlparse(mv.source).path)  # the local store's file:// artifacts
    assert info.signature is not None and info.signature.inputs.input_names() == ["video"]
    assert "python_model.pkl" not in {p.name for p in Path(urlparse(mv.source).path).iterdir()}


def test_fetched_models_are_cached_once_per_run_under_the_home(registered):
    from stm import home
    from stm.train.registry import fetch_model

    first, _ = fetch_model(registered["uri"], f"models:/{MODEL}/1")
    again, _ = fetch_model(registered["uri"], run_id=registered["runs"][0])
    assert first == again == home.model_cache() / registered["runs"][0]
    stamp = (first / "checkpoint.pt").stat().st_mtime_ns
    fetch_model(registered["uri"], f"models:/{MODEL}/1")
    assert (first / "checkpoint.pt").stat().st_mtime_ns == stamp  # reused, not downloaded again
    assert sorted(p.name for p in first.iterdir()) == [
        ".complete",
        "checkpoint.pt",
        "classes.json",
        "config.json",
        "dataset.json",
    ]


def test_registry_round_trip_keeps_the_model_and_its_preprocessing(registered):
    from stm.train.predict import load_model_dir, predict_video
    from stm.train.registry import fetch_model

    folder, source = fetch_model(registered["uri"], f"models:/{MODEL}/1")
    loaded = load_model_dir(folder, source)
    assert "version 1" in source
    assert loaded.preprocessing["flow"] == "dis" and loaded.preprocessing["short_side"] is None
    assert loaded.class_names == list(SYNTHETIC_CLASSES)
    pred = predict_video(loaded, registered["video"], top_k=6)
    assert [n for n, _ in pred.top] != [] and pred.frames == 12
    fused = pred.scores["fused"]
    assert fused.shape == (6,) and np.isclose(fused.sum(), 1.0, atol=1e-4)
    # logit fusion (the original's): softmax of the averaged logits, i.e. the normalised
    # geometric mean of the streams' probabilities
    geometric = np.sqrt(pred.scores["appearance"] * pred.scores["motion"])
    assert np.allclose(fused, geometric / geometric.sum(), atol=1e-5)
    # the same network straight from the original checkpoint scores the video identically
    direct = predict_video(load_model_dir(registered["checkpoint"]), registered["video"], top_k=6)
    assert np.allclose(direct.scores["fused"], fused, atol=1e-6)
    # a run id works too (the run's "model" artifact)
    folder, source = fetch_model(registered["uri"], run_id=registered["run_id"])
    assert (folder / "checkpoint.pt").is_file() and source == f"run {registered['run_id']}"


def test_pyfunc_flavour_predicts_top5_rows(registered):
    import mlflow.pyfunc
    import pandas as pd

    from stm.train.registry import model_version

    mv = model_version(registered["uri"], f"models:/{MODEL}/2")
    mlflow.set_tracking_uri(registered["uri"])
    try:
        model = mlflow.pyfunc.load_model(mv.source)  # unpickles python_model.pkl: a trusted store
    finally:
        mlflow.set_tracking_uri(None)
    out = model.predict(pd.DataFrame({"video": [registered["video"]]}), params={"top_k": 3})
    assert list(out.columns) == ["video", "rank", "class", "score"]
    assert list(out["rank"]) == [1, 2, 3]
    assert list(out["score"]) == sorted(out["score"], reverse=True)


def test_a_model_that_does_not_say_its_preprocessing_needs_flow_and_short_side(
    registered, tmp_path
):
    """Never a guess: a checkpoint whose data is gone and that carries no dataset settings."""
    state = torch.load(registered["checkpoint"] / "checkpoint.pt", weights_only=True)
    state["config"]["data"] = str(tmp_path / "gone")
    torch.save(state, tmp_path / "orphan.pt")
    args = [registered["video"], "--model", str(tmp_path / "orphan.pt"), "--device", "cpu"]
    proc = _predict(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "give --flow and --short-side" in lines[0], lines
    proc = _predict([*args, "--flow", "dis", "--short-side", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "orphan.pt" in proc.stdout.splitlines()[0]  # that file, not a checkpoint.pt beside it


def _predict_main():
    spec = importlib.util.spec_from_file_location("predict_job", ROOT / "jobs" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_predict_bad_video_is_one_line_and_exit_2(registered):
    proc = _predict(
        ["/nonexistent/video.avi", "--model", f"models:/{MODEL}/latest"]
        + ["--mlflow-uri", registered["uri"]],
        registered["tmp"],
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "file not found" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "models:/no-such-model/latest"], "no registered model no-such-model"),
        (["--model", f"models:/{MODEL}/7"], f"--model models:/{MODEL}/7: "),
        (["--run-id", "0123456789abcdef"], "--run-id 0123456789abcdef: "),
        (["--model", "x", "--run-id", "y"], "give one of --model or --run-id"),
        (["--model", "models:/no-such-model@best"], "(MLflow store sqlite:///"),
        (["--model", "x", "--top-k", "0"], "invalid --top-k 0: need between 1 and"),
    ],
)
def test_predict_usage_errors_are_one_line_and_exit_2(registered, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        _predict_main()([registered["video"], *args, "--mlflow-uri", registered["uri"]])
    assert exit_.value.code == 2
    lines = own_lines(capsys.readouterr().err)  # not the training workers' forwarded logs
    assert len(lines) == 1 and lines[0].startswith("predict.py: error: ") and message in lines[0]
