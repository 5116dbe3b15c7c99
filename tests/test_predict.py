"""Registered models: a checkpoint into the MLflow registry and back out of ``models:/`` URIs,
``jobs/predict.py`` on a synthetic video, the pyfunc flavour. No Ray, no training: a randomly
initialised small network is enough to check ranking and the round trip."""

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


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """Two registered versions of one random small model, a synthetic video, the store URI."""
    from stm.model import build_model
    from stm.train import tracking
    from stm.train.registry import register_checkpoint

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
    run_id = tracking.start_run(uri, "stm", "predict-test", to_dict(cfg), {"kind": "test"})
    tracking.end_run(uri, run_id)
    versions = [
        register_checkpoint(uri, run_id, ckpt, MODEL, data=str(data), tags={"variant": "x"})
        for _ in range(2)
    ]
    videos = Path(generate_synthetic(str(tmp / "videos"), num_videos=6, num_frames=12))
    return {
        "uri": uri,
        "run_id": run_id,
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


def test_predict_job_prints_a_ranked_top5_from_the_latest_registered_version(registered):
    assert registered["versions"] == [1, 2]
    proc = _predict(
        [
            registered["video"],
            "--model",
            f"models:/{MODEL}/latest",
            "--mlflow-uri",
            registered["uri"],
        ],
        registered["tmp"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert f"{MODEL} version 2" in lines[0]  # "latest" is the newest version
    ranked = [ln.split() for ln in lines[1:]]
    assert [r[0] for r in ranked] == ["1.", "2.", "3.", "4.", "5."]
    names = [r[1] for r in ranked]
    scores = [float(r[2]) for r in ranked]
    assert set(names) <= set(SYNTHETIC_CLASSES) and len(set(names)) == 5
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-3


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
    assert (folder / "checkpoint.pt").is_file() and source.endswith("/model")


def test_pyfunc_flavour_predicts_top5_rows(registered):
    import mlflow.artifacts
    import mlflow.pyfunc

    from stm.train.registry import model_version

    mv = model_version(registered["uri"], f"models:/{MODEL}/2")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source,
        dst_path=str(registered["tmp"] / "pyfunc"),
        tracking_uri=registered["uri"],
    )
    model = mlflow.pyfunc.load_model(local)
    out = model.predict([registered["video"]])
    assert list(out["rank"]) == [1, 2, 3, 4, 5]
    assert list(out["score"]) == sorted(out["score"], reverse=True)


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
        ([], "give one of --model or --run-id"),
        (["--model", "x", "--top-k", "0"], "invalid --top-k 0: need between 1 and"),
    ],
)
def test_predict_usage_errors_are_one_line_and_exit_2(registered, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        _predict_main()([registered["video"], *args, "--mlflow-uri", registered["uri"]])
    assert exit_.value.code == 2
    lines = own_lines(capsys.readouterr().err)  # not the training workers' forwarded logs
    assert len(lines) == 1 and lines[0].startswith("predict.py: error: ") and message in lines[0]
