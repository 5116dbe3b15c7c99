"""Bad input is one line and exit status 2, never a traceback, and nothing is computed first:
storage paths, MLflow stores, datasets, init checkpoints, GPUs, out-of-range numbers; and URIs
with query strings keep their query at the end when paths are joined."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stm.storage import absolute, join

ROOT = Path(__file__).resolve().parents[1]


def _job(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="local")  # a job that gets as far as Ray starts its own
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line(proc: subprocess.CompletedProcess, prog: str, message: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture()
def broken_data(synthetic, tmp_path) -> Path:
    """A copy of the session's dataset, to break."""
    copy = tmp_path / "data"
    shutil.copytree(synthetic, copy)
    return copy


def test_train_before_anything_is_computed(synthetic, broken_data, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder, not a database, not a checkpoint\n")
    common = ["--init", "scratch", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    cases = [
        (["--data", synthetic, "--storage-path", str(a_file)], f"--storage-path {a_file}: "),
        (["--data", synthetic, "--mlflow-uri", f"sqlite:///{a_file}"], "is not usable"),
    ]
    (broken_data / "classes.json").write_text("{")
    cases.append((["--data", str(broken_data)], "classes.json: "))
    for args, message in cases:
        _one_line(_job("train.py", [*common, *args], tmp_path), "train.py", message)
    (broken_data / "classes.json").write_text(
        json.dumps(json.loads(Path(synthetic, "classes.json").read_text()))
    )
    (broken_data / "dataset.json").unlink()
    proc = _job("train.py", [*common, "--data", str(broken_data)], tmp_path)
    _one_line(proc, "train.py", "dataset.json: ")
    assert "rerun jobs/preprocess.py" in proc.stderr


def test_train_init_files_and_gpus(synthetic, tmp_path):
    a_file = tmp_path / "not-a-checkpoint.pt"
    a_file.write_bytes(b"x" * 100)
    common = ["--data", synthetic, "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    common += ["--storage-path", str(tmp_path / "runs")]
    proc = _job(
        "train.py",
        [*common, "--appearance-init", str(a_file), "--motion-init", str(a_file)],
        tmp_path,
    )
    _one_line(proc, "train.py", f"--appearance-init {a_file}: not an stm checkpoint")
    proc = _job("train.py", [*common, "--init", "scratch", "--gpus-per-worker", "1"], tmp_path)
    _one_line(proc, "train.py", "need 1 GPUs; this machine's Ray has 0")  # not a wait forever
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_out_of_range_numbers_and_names(tmp_path):
    for script, args, message in (
        ("predict.py", ["v.avi", "--short-side", "-5"], "invalid --short-side -5"),
        (
            "preprocess.py",
            ["--source", "synthetic", "--out", "o", "--seed", "-1"],
            "invalid --seed -1",
        ),
        ("train.py", ["--name", "../../x"], "invalid --name '../../x'"),
    ):
        _one_line(_job(script, args, tmp_path), script, message)


def test_uris_with_a_query_string_join_before_it():
    uri = "s3://bucket/prefix?region=us-east-1"
    assert join(uri, "runs", "x") == "s3://bucket/prefix/runs/x?region=us-east-1"
    assert absolute("s3://bucket/prefix/?region=eu-west-1") == "s3://bucket/prefix?region=eu-west-1"
    assert join("/local", "a") == "/local/a"


def test_a_missing_shard_is_named_before_training(broken_data, tmp_path):
    """A deleted shard would silently shrink the training set: the manifest says what is gone."""
    shard = sorted((broken_data / "shards").glob("*.parquet"))[0]
    shard.unlink()
    common = ["--init", "scratch", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    proc = _job("train.py", [*common, "--data", str(broken_data)], tmp_path)
    _one_line(proc, "train.py", "videos its manifest records as done are in no shard")
    assert f"rerun jobs/preprocess.py --out {broken_data}" in proc.stderr


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs; needs root, as CI and the dev machine have)."""
    where = tmp_path / "small"
    where.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_storage_path_stops_before_a_half_written_checkpoint(
    synthetic, small_disk, tmp_path
):
    """A checkpoint that does not fit is not started: one line, the run FAILED with the
    reason, nothing half-written (Ray Train would otherwise leave a truncated checkpoint.pt on
    every restart)."""
    from mlflow.tracking import MlflowClient

    from tiny import own_lines  # tests/tiny.py

    args = ["--init", "scratch", "--data", synthetic, "--storage-path", str(small_disk)]
    args += ["--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", "--epochs", "1", "--name", "full"]
    args += ["--num-chunks", "2", "--crop-size", "48", "--test-frames", "2", "--model-name", ""]
    proc = _job("train.py", args, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"stopped after epoch 1: the storage path {small_disk / 'full'} has" in lines[0]
    assert "continue with --resume --name full" in lines[0]
    assert "Traceback" not in "\n".join(own_lines(proc.stderr))
    assert not list((small_disk / "full").glob("checkpoint_*"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("stm").experiment_id])
    assert run.info.status == "FAILED" and "MiB free" in run.data.tags["error"]


def test_ray_train_failures_are_one_line_and_half_written_checkpoints_go(tmp_path):
    from ray.train import WorkerGroupError

    from stm.config import embedded_default
    from stm.train.run import failure
    from stm.train.runs import remove_unrecorded_checkpoints

    cfg = embedded_default(name="r1", max_failures=3)
    full = OSError(28, "No space left on device")
    err = failure(cfg, "/runs/r1", WorkerGroupError("Traceback ...\nOSError: ...", {0: full}))
    assert str(err).startswith("run r1 failed after 3 restarts: [Errno 28] No space left")
    assert str(err).endswith("kept in /runs/r1: continue with --resume --name r1")
    for name in ("checkpoint_2026-01-01_00-00-00.1", "checkpoint_2026-01-01_00-01-00.2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"half")
    snapshot = {"checkpoints": [{"path": str(tmp_path / "checkpoint_2026-01-01_00-00-00.1")}]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    removed = remove_unrecorded_checkpoints(str(tmp_path))
    assert [Path(p).name for p in removed] == ["checkpoint_2026-01-01_00-01-00.2"]
    assert (tmp_path / "checkpoint_2026-01-01_00-00-00.1" / "checkpoint.pt").exists()


def test_unreachable_or_malformed_object_store_uris_are_one_line(synthetic, tmp_path, monkeypatch):
    """s3:// at --data and --storage-path when nothing answers (a closed local port stands in
    for an unreachable or forbidden bucket), and a URI pyarrow cannot parse."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stm-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stm-test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    closed = "s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http"
    common = ["--init", "scratch", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for args, message in (
        (["--data", closed], f"--data {closed}: cannot be read: "),
        (["--data", "s3://bucket/x?bogus=1"], "Unexpected query parameter in S3 URI: 'bogus'"),
        (["--data", synthetic, "--storage-path", closed], f"--storage-path {closed}: "),
    ):
        _one_line(_job("train.py", [*common, *args], tmp_path), "train.py", message)
