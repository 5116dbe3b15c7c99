"""The training job end to end: a real local Ray, real Ray Train workers, a real MLflow store,
real synthetic videos preprocessed by the real pipeline. Smoke sizes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from stm.config import embedded_default

from tiny import start_job, wait_for_checkpoint  # tests/tiny.py

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(
    epochs=2,
    batch_size=8,
    bn_batch=4,
    crop_size=48,
    num_chunks=2,
    stride_min=2,
    stride_max=4,
    test_frames=3,
    num_workers=2,
    cpus_per_worker=0.5,
    max_failures=0,
    lr=0.005,
)
SMOKE_FLAGS = [
    "--init",
    "scratch",  # real --data: the fused stage would start from stream runs
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--bn-batch",
    "4",
    "--crop-size",
    "48",
    "--num-chunks",
    "2",
    "--stride-min",
    "2",
    "--stride-max",
    "4",
    "--test-frames",
    "3",
    "--num-workers",
    "2",
    "--cpus-per-worker",
    "0.5",
    "--lr",
    "0.005",
]


def smoke_config(data: str, tmp: Path, **kw):
    cfg = embedded_default(
        data=data,
        storage_path=str(tmp / "runs"),
        mlflow_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        **SMOKE,
    )
    return dataclasses.replace(cfg, **kw)


def mlflow_client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def test_two_worker_run_logs_to_mlflow_and_syncs_once_per_update(synthetic, tmp_path):
    """Also the --decode device path end to end: Ray Data ships planned clips (JPEG bytes) and
    each worker decodes them with torchvision (on the CPU here, nvJPEG on a GPU)."""
    from stm.train.checkpoint import MODEL_CHECKPOINT, model_from_checkpoint
    from stm.train.run import run_training

    cfg = smoke_config(synthetic, tmp_path, name="two-workers", decode="device")
    summary = run_training(cfg)
    m = summary.metrics
    assert m["epoch"] == 2 and m["start_epoch"] == 1
    # 24 videos / 2 workers / bn 4 = 3 micro-batches, accum 1 -> 3 updates, 3 all-reduces
    assert m["updates"] == 3 and m["grad_syncs"] == m["updates"]
    assert m["test_videos"] == 6
    for name in ("appearance", "motion", "fused"):
        assert 0.0 <= m[f"test_video_acc_{name}"] <= 1.0

    client = mlflow_client(tmp_path)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion"] == "residual_mul"
    assert run.data.params["batch_size"] == "8" and run.data.params["decode"] == "device"
    assert run.data.tags["stage"] == "fused" and "residual_mul" in run.data.tags["variant"]
    # the UI: the run says what it trained on what; the experiment opens on its training runs
    description = run.data.tags["mlflow.note.content"]
    assert "fused stage" in description and "24 training, 6 test videos" in description
    assert run.data.params["lr"] == "0.005" and run.data.params["init"] == "scratch"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(summary.run_id, "train_loss")
    assert [h.step for h in history] == [1, 2]
    assert client.get_metric_history(summary.run_id, "test_video_acc_fused")
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"confusion_matrix.png", "per_class_accuracy.csv", "model"} <= artifacts
    assert run.data.params["dataset.flow"] == "dis"  # the data's preprocessing, with the run
    # the best checkpoint, once: inside the run's pyfunc model, which the registry points at
    local = client.download_artifacts(summary.run_id, MODEL_CHECKPOINT, str(tmp_path / "dl"))
    model, cfg = model_from_checkpoint(local)  # torch.load(weights_only=True) inside
    assert cfg.model.num_classes == 6 and cfg.name == "two-workers"
    state = torch.load(Path(local) / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "epoch", "config", "class_names", "dataset"}
    assert "optimizer" not in state and state["dataset"]["flow"] == "dis"
    (version,) = client.search_model_versions("name = 'stm'")
    assert version.run_id == summary.run_id and version.source.endswith("/model")
    assert version.tags["dataset"] == "synthetic" and version.tags["split"] == "1"
    assert float(version.tags["score"]) == pytest.approx(m["score"], abs=1e-6)
    best = client.get_model_version_by_alias("stm", "best-synthetic-split1")
    assert (
        best.version == version.version == client.get_model_version_by_alias("stm", "best").version
    )
    assert summary.registered == f"stm version {version.version} (alias best-synthetic-split1)"


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_killed_worker_restarts_from_last_checkpoint(synthetic, tmp_path):
    from stm.train.run import run_training

    cfg = smoke_config(
        synthetic, tmp_path, name="kill-worker", epochs=3, max_failures=2, eval_every=3
    )
    killed: list[int] = []

    def killer() -> None:
        wait_for_checkpoint(tmp_path / "runs" / "kill-worker")
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_training(cfg)
    thread.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    m = summary.metrics
    assert m["epoch"] == 3
    assert m["start_epoch"] >= 2  # the restarted group continued from a checkpoint


def _train(args: list[str], tmp: Path) -> subprocess.Popen:
    """``jobs/train.py ARGS`` into ``tmp``'s runs and MLflow store, on its own local Ray."""
    flags = [
        *args,
        "--storage-path",
        str(tmp / "runs"),
        "--mlflow-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
    ]
    return start_job("train.py", flags, dict(os.environ, RAY_ADDRESS="local"), tmp)


def test_resume_after_the_job_is_killed_continues_epoch_and_lr(synthetic, tmp_path):
    args = [
        "--data",
        synthetic,
        *SMOKE_FLAGS,
        "--epochs",
        "3",
        "--lr-milestones",
        "2",
        "--eval-every",
        "3",
        "--name",
        "resumable",
    ]
    first = _train(args, tmp_path)
    try:
        wait_for_checkpoint(tmp_path / "runs" / "resumable")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    second = _train(
        [
            "--data",
            synthetic,
            *SMOKE_FLAGS,
            "--resume",
            "--epochs",
            "3",
            "--lr-milestones",
            "2",
            "--eval-every",
            "3",
        ],
        tmp_path,
    )
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert "resumable" in out

    client = mlflow_client(tmp_path)
    run_id = (tmp_path / "runs" / "resumable" / "mlflow_run_id").read_text().strip()
    starts = client.get_metric_history(run_id, "start_epoch")
    assert max(s.value for s in starts) >= 2  # the resumed job did not restart at epoch 1
    lr = {h.step: h.value for h in client.get_metric_history(run_id, "lr")}
    assert lr[3] == pytest.approx(0.0005) and lr[1] == pytest.approx(0.005)
    assert client.get_run(run_id).info.status == "FINISHED"

    # a resume takes the run's own config: a flag that contradicts it, or a finished run, is
    # one line and exit 2, and the finished run's record stays as it was
    for extra, message in (
        (["--lr", "0.1"], "run resumable was started with other values: --lr 0.1 (the run: 0.005)"),
        ([], "run resumable finished; nothing to resume"),
    ):
        again = _train(["--resume", "--name", "resumable", *extra], tmp_path)
        out, _ = again.communicate(timeout=120)
        lines = [ln for ln in out.splitlines() if ln.startswith("train.py: error")]
        assert again.returncode == 2 and lines and message in lines[0], out[-2000:]
        assert "Traceback" not in out
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--fusion", "concat"], "invalid choice"),
        (["--bn-batch", "3"], "must divide"),
        (["--data", "/nonexistent/data"], "no shards"),
        (["--split", "3"], "--split 3"),
        (["--mlflow-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--num-workers", "2", "--gpus-per-worker", "0.5"], "several ranks on one GPU"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(synthetic, tmp_path, flags, message):
    args = [*flags, "--init", "scratch"]
    if "--data" not in args:
        args = ["--data", synthetic, *args]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_classes_file_matches_labels(synthetic):
    classes = json.loads((Path(synthetic) / "classes.json").read_text())
    assert len(classes) == 6


def _readme_stage_commands() -> list[list[str]]:
    """The README's three ``python jobs/train.py --data data/ucf101 --stage ...`` commands."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if ln.startswith("python jobs/train.py --data data/")]
    return [shlex.split(ln.split("#")[0])[2:] for ln in lines]


def test_readme_stage_commands_run_as_written(synthetic, tmp_path, capsys):
    """The README's appearance, motion and fused commands, at small sizes (flags appended): the
    streams train alone (no fusion, no temporal filters, one chunk per video, from ImageNet);
    the fused stage starts from the two stream runs, and its init tag says so."""
    import importlib.util
    import re

    from torchvision import models

    from stm.model.imagenet import weight_file_names

    weights = tmp_path / "imagenet"  # stands in for torchvision's ImageNet file (no download)
    weights.mkdir()
    torch.save(
        models.resnet18(weights=None).state_dict(), weights / weight_file_names("resnet18")[0]
    )
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    small = [
        *("--appearance-arch", "resnet18", "--motion-arch", "resnet18", "--num-workers", "1"),
        *("--gpus-per-worker", "0", "--cpus-per-worker", "0.5", "--epochs", "1"),
        *("--batch-size", "4", "--bn-batch", "4", "--crop-size", "48", "--test-frames", "3"),
        *("--stride-min", "2", "--stride-max", "4", "--imagenet-dir", str(weights)),
        *("--storage-path", str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"),
    ]
    commands = _readme_stage_commands()
    assert [c[c.index("--stage") + 1] for c in commands] == ["appearance", "motion", "fused"]
    ids: dict[str, str] = {}
    for args in commands:
        stage = args[args.index("--stage") + 1]
        args = [synthetic if a == "data/ucf101" else a for a in args]
        args = [ids.get(a, a) for a in args]  # RUN_ID_A / RUN_ID_M: the stream runs
        extra = ["--num-chunks", "2"] if stage == "fused" else []
        assert job.main([*args, *small, *extra]) == 0
        out = capsys.readouterr().out
        run_id = re.search(r"^run \S+ \((\w+)\)", out, re.M).group(1)
        ids["RUN_ID_A" if stage == "appearance" else "RUN_ID_M"] = run_id
        ids[stage] = run_id
    client = mlflow_client_at(f"sqlite:///{tmp_path}/m.db")
    for stage in ("appearance", "motion"):
        run = client.get_run(ids[stage])
        params = run.data.params
        assert (params["model.fusion"], params["model.temporal"], params["num_chunks"]) == (
            "none",
            "none",
            "1",
        )
        assert run.data.tags["init"] == "ImageNet" and float(params["lr"]) == 0.01
    fused = client.get_run(ids["fused"])
    assert (
        fused.data.tags["init"]
        == f"appearance from {ids['appearance']}, motion from {ids['motion']}"
    )
    assert fused.data.params["model.fusion"] == "residual_mul"


def mlflow_client_at(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _kill(job: subprocess.Popen) -> None:
    os.killpg(job.pid, signal.SIGKILL)  # the driver and everything it started, as a lost node
    job.wait()


def test_resume_continues_the_run_that_checkpointed_not_the_one_that_started_last(
    synthetic, tmp_path
):
    """Run "saved" is killed after its first checkpoint, run "unsaved" before its first: a
    plain --resume continues "saved" from epoch 2, and the killed drivers' MLflow runs do not
    stay RUNNING (the next start marks "unsaved" KILLED; "saved" is resumed, then FINISHED)."""
    common = ["--data", synthetic, *SMOKE_FLAGS, "--num-workers", "1", "--eval-every", "2"]
    saved = _train([*common, "--name", "saved"], tmp_path)
    try:
        wait_for_checkpoint(tmp_path / "runs" / "saved")
    finally:
        _kill(saved)
    unsaved = _train([*common, "--name", "unsaved"], tmp_path)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "runs" / "unsaved" / "mlflow_run_id").is_file():
            assert time.time() < deadline and unsaved.poll() is None
            time.sleep(0.2)
    finally:
        _kill(unsaved)
    client = mlflow_client(tmp_path)
    ids = {
        n: (tmp_path / "runs" / n / "mlflow_run_id").read_text().strip()
        for n in ("saved", "unsaved")
    }
    assert client.get_run(ids["unsaved"]).info.status == "RUNNING"  # its driver died

    again = _train(["--resume"], tmp_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert "run saved (" in out
    starts = client.get_metric_history(ids["saved"], "start_epoch")
    assert max(s.value for s in starts) == 2  # continued, not started again
    assert client.get_run(ids["saved"]).info.status == "FINISHED"
    assert client.get_run(ids["unsaved"]).info.status == "KILLED"
