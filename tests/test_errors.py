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
        timeout=180,
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
