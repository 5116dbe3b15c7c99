"""Stored data that went bad is never trained on: every JPEG carries a crc32 written at
preprocessing, the samplers check what they decode, a bad video is skipped, named and counted,
DDP workers keep making the same steps, and past ``--max-bad-videos`` the run stops with one
line. Real shards, a real local Ray, real Ray Train workers (two, DDP) and a real MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train_job import SMOKE_FLAGS, mlflow_client  # tests/test_train_job.py

from stm.data import shards as S
from stm.data.clips import VIDEO_KEY, FrameCache, TrainClipSpec, train_batch, video_key
from stm.data.device_clips import plan_train_batch
from stm.train.loop import fixed_steps, missing_videos

from tiny import ROOT, own_lines  # tests/tiny.py


def _job(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python jobs/train.py ARGS`` on its own local Ray, to its end."""
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), *args],
        cwd=cwd,
        env=dict(os.environ, RAY_ADDRESS="local"),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _flip_bytes(jpeg: bytes) -> bytes:
    """The JPEG with 64 bytes in its middle inverted: still a JPEG header, garbage pixels."""
    data = bytearray(jpeg)
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
    return bytes(data)


def _rewrite(path: Path, change) -> None:
    """Rewrite one shard file with ``change(row) -> row`` applied to each row (a valid Parquet
    file again, one row group per video, as the pipeline writes them)."""
    rows = [change(r) for r in pq.read_table(path).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=S.SHARD_SCHEMA), path, row_group_size=1)


def _training_videos(data: Path) -> list[tuple[Path, str]]:
    """(shard file, video id) of split 1's training videos, in file order."""
    out = []
    for path in sorted((data / "shards").glob("*.parquet")):
        table = pq.read_table(path, columns=[S.VIDEO_ID, S.TRAIN_SPLITS])
        out += [(path, r[S.VIDEO_ID]) for r in table.to_pylist() if 1 in r[S.TRAIN_SPLITS]]
    return out


def corrupt(data: Path) -> tuple[str, str]:
    """Break two training videos of ``data``: A's JPEG bytes flipped (the checksums left as
    they were, as a bad disk or a bad copy leaves them), B's JPEGs replaced by bytes that are
    no JPEG, with matching checksums (a writer that stored garbage). Returns (A, B)."""
    (path_a, a), (path_b, b) = _training_videos(data)[:2]

    def flip(row):
        if row[S.VIDEO_ID] == a:
            for column in S.JPEG_COLUMNS:
                row[column] = [_flip_bytes(j) for j in row[column]]
        return row

    def garbage(row):
        if row[S.VIDEO_ID] == b:
            for column, sums in S.CHECKSUMS.items():
                row[column] = [b"not a jpeg %d" % k for k in range(len(row[column]))]
                row[sums] = [zlib.crc32(j) for j in row[column]]
        return row

    _rewrite(path_a, flip)
    _rewrite(path_b, garbage)
    return a, b


def _row(data: Path, video_id: str) -> dict:
    for path in sorted((data / "shards").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row[S.VIDEO_ID] == video_id:
                return row
    raise KeyError(video_id)


@pytest.fixture()
def corrupted(synthetic, tmp_path) -> tuple[Path, str, str]:
    data = tmp_path / "synthetic"
    shutil.copytree(synthetic, data)
    return (data, *corrupt(data))


def test_checksums_are_written_and_checked_before_decoding(synthetic, corrupted):
    data, a, b = corrupted
    good = pq.read_table(sorted(Path(synthetic, "shards").glob("*.parquet"))[0]).to_pylist()[0]
    assert good[S.RGB_CRC32] == [zlib.crc32(j) for j in good[S.RGB]]
    assert S.row_problem(good) is None
    assert "rgb[0] does not match its checksum" in S.row_problem(_row(data, a))
    assert "rgb[0] does not match its checksum" in str(_check_all(_row(data, a)))
    assert "rgb[0] is not a JPEG" in str(_check_all(_row(data, b)))
    del good[S.RGB_CRC32]  # a shard from before checksums: decoding is the only check
    assert FrameCache(good).get(S.RGB, 0).shape[2] == 3


def _check_all(row: dict) -> S.CorruptVideo | None:
    try:
        FrameCache(row).get(S.RGB, 0)
    except S.CorruptVideo as e:
        return e
    return None


def test_samplers_skip_bad_videos_and_the_loop_keeps_its_steps(synthetic, corrupted):
    data, a, b = corrupted
    rows = [_row(data, a), _row(Path(synthetic), a), _row(data, b)]
    table = pa.Table.from_pylist(rows, schema=S.SHARD_SCHEMA)
    spec = TrainClipSpec(num_chunks=2, flow_length=2, crop_size=32, stride_range=(1, 2))
    clips = train_batch(table, spec, epoch=1, seed=0)
    assert clips[VIDEO_KEY].tolist() == [video_key(a)]  # only the intact copy of a
    assert plan_train_batch(table, spec, epoch=1, seed=0).column(VIDEO_KEY).to_pylist() == [
        video_key(a)
    ]
    # a worker whose skipped videos left it short repeats its last micro-batch; the rest of
    # a longer epoch is read (its keys kept) but not trained on
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in clips.items()}
    keys: list[torch.Tensor] = []
    got = list(fixed_steps(iter([dict(batch)]), 3, keys))
    assert len(got) == 3 and got[2] is got[0]
    keys = []
    assert len(list(fixed_steps(iter([dict(batch), dict(batch)]), 1, keys))) == 1
    assert len(keys) == 2
    assert missing_videos([a, b], keys) == [b]


def test_training_skips_names_and_counts_bad_videos_then_stops_past_the_bound(corrupted, tmp_path):
    data, a, b = corrupted
    common = [*SMOKE_FLAGS, "--data", str(data), "--storage-path", str(tmp_path / "runs")]
    common += ["--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--model-name", ""]
    proc = _job([*common, "--name", "within", "--epochs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping video {a}: rgb[" in proc.stderr and "does not match its checksum" in (
        proc.stderr
    )
    assert f"skipping video {b}: " in proc.stderr and "] is not a JPEG" in proc.stderr
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("stm").experiment_id], "tags.`mlflow.runName` = 'within'"
    )
    assert run.data.metrics["bad_videos"] == 2
    assert sorted([a, b]) == sorted(n for n in (a, b) if n in run.data.tags["bad_videos"])

    proc = _job([*common, "--name", "stops", "--max-bad-videos", "1"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "stopped: epoch 1: 2 stored videos skipped" in lines[0] and a in lines[0]
    assert f"--verify --out {data}" in lines[0]
    assert "Traceback" not in "\n".join(own_lines(proc.stderr))  # Ray's own threads may print
    (run,) = client.search_runs(
        [client.get_experiment_by_name("stm").experiment_id], "tags.`mlflow.runName` = 'stops'"
    )
    assert run.info.status == "FAILED" and "max-bad-videos" in run.data.tags["error"]
    assert run.data.metrics["epoch"] == 1  # it stopped after the epoch that found them
    assert list((tmp_path / "runs" / "stops").glob("checkpoint_*/checkpoint.pt"))  # kept
