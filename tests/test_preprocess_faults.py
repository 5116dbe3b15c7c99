"""Preprocessing under faults, on real files and the real local Ray: --verify finds and redoes
corrupted stored videos, a full disk makes retry rows that a plain rerun redoes, one run per OUT
(the lock), a shard streamed one video at a time (and a kill mid-group), an unreachable --out.

Datasets are tiny (6 synthetic videos of 8 frames, DIS flow).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from stm import locks as L
from stm import storage
from stm.config import JPEG_QUALITY, PreprocessConfig, UsageError
from stm.data import preprocess as P
from stm.data import shards as S
from stm.data.decode import DecodeError
from stm.data.flow import make_estimator
from stm.data.synthetic import generate_synthetic, write_video

from tiny import own_lines  # tests/tiny.py

REPO = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(REPO / "jobs" / "preprocess.py")]


def tiny(root: Path, out: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        source="synthetic", root=str(root), out=str(out), flow="dis", num_videos=6,
        synthetic_frames=8, videos_per_shard=2, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """(videos, a preprocessed OUT of them): 6 videos in 3 shards of 2. Copy OUT to change it."""
    base = tmp_path_factory.mktemp("faults")
    summary = P.run_preprocess(tiny(base / "videos", base / "out"))
    assert (summary.ok, summary.failed) == (6, 0)
    return base / "videos", base / "out"


def copy_of(made, tmp_path: Path) -> tuple[Path, Path]:
    videos, out = made
    shutil.copytree(out, tmp_path / "out")
    return videos, tmp_path / "out"


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("part-*.parquet"))}


def all_rows(out: Path) -> list[dict]:
    return pads.dataset(str(out / "shards"), format="parquet").to_table().to_pylist()


def flip(data: bytes) -> bytes:
    """The JPEG with a few bytes in its middle inverted (same length, checksum now wrong)."""
    b = bytearray(data)
    for k in range(len(b) // 2, len(b) // 2 + 4):
        b[k] ^= 0xFF
    return bytes(b)


def corrupt(path: Path, edits: dict[int, tuple[str, int]]) -> list[str]:
    """Rewrite shard ``path`` (a valid Parquet file, checksum columns unchanged) with JPEG
    ``column[index]`` of row ``r`` flipped for each ``r: (column, index)``; the videos' ids."""
    rows = pq.read_table(path).to_pylist()
    for r, (column, index) in edits.items():
        rows[r][column][index] = flip(rows[r][column][index])
    table = pa.Table.from_pylist(rows, schema=S.SHARD_SCHEMA)
    S.write_table_atomic(pafs.LocalFileSystem(), str(path), table)
    return [rows[r][S.VIDEO_ID] for r in edits]


# --- 1. --verify ---------------------------------------------------------------------------------
def test_verify_finds_corrupt_videos_and_redoes_only_them(made, tmp_path: Path, caplog) -> None:
    videos, out = copy_of(made, tmp_path)
    plain = P.run_preprocess(tiny(videos, out))  # without --verify: nothing to do, and a hint
    assert (plain.processed, plain.verified) == (0, None)
    assert "nothing left to do (6 already done); --verify checks every stored JPEG" in plain.line()

    files = sorted((out / "shards").glob("part-*.parquet"))
    assert len(files) == 3 and all(pq.ParquetFile(f).metadata.num_rows == 2 for f in files)
    a, b, c = files
    other = pq.read_table(a)[S.VIDEO_ID].to_pylist()[1]
    one = corrupt(a, {0: ("rgb", 2)})  # one of its two videos
    both = corrupt(b, {0: ("flow_u", 1), 1: ("rgb", 0)})  # both: the file must go
    kept = c.read_bytes()
    assert all(S.row_problem(r) is None for r in pq.read_table(c).to_pylist())
    assert S.row_problem(pq.read_table(a).to_pylist()[0]) == "rgb[2] does not match its checksum"

    caplog.set_level(logging.WARNING, logger="stm.data.preprocess")
    summary = P.run_preprocess(tiny(videos, out, verify=True))
    assert (summary.verified, summary.verify_failed) == (6, 3)
    assert (summary.processed, summary.skipped, summary.ok, summary.failed) == (3, 3, 6, 0)
    assert "verified 6 stored videos: 3 failed verification and were processed again" in (
        summary.line()
    )
    warned = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(warned) == 3, warned
    problems = {
        one[0]: (a.name, "rgb[2] does not match its checksum"),
        both[0]: (b.name, "flow_u[1] does not match its checksum"),
        both[1]: (b.name, "rgb[0] does not match its checksum"),
    }
    for video, (shard, problem) in problems.items():
        assert [w for w in warned if video in w and shard in w and problem in w], (video, warned)

    assert c.read_bytes() == kept  # the intact shard is untouched
    assert pq.read_table(a)[S.VIDEO_ID].to_pylist() == [other]  # its other video stays
    assert not b.exists()
    rows = all_rows(out)
    ids = [r[S.VIDEO_ID] for r in rows]
    assert len(ids) == 6 == len(set(ids))
    assert all(S.row_problem(r) is None for r in rows)
    manifest = S.read_manifest(str(out)).to_pylist()
    assert len(manifest) == 6 and {r["status"] for r in manifest} == {"ok"}

    again = P.run_preprocess(tiny(videos, out, verify=True))
    assert (again.verified, again.verify_failed, again.processed) == (6, 0, 0)
    assert "verified 6 stored videos: all intact; nothing left to do" in again.line()


# --- 2. retry: failures not about the video ------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 8 MiB tmpfs (root only: skipped where mounting fails)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {run.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def test_failure_status_of_real_errors(small_disk: Path, tmp_path: Path) -> None:
    fill(small_disk, 0)
    fs = pafs.LocalFileSystem()
    with pytest.raises(OSError) as full, fs.open_output_stream(str(small_disk / "x")) as f:
        f.write(b"\1" * 100_000)
    assert full.value.errno == errno.ENOSPC
    assert P.failure_status(full.value) == S.STATUS_RETRY  # a full disk
    bad = tmp_path / "bad.avi"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    item = {"video_id": "bad", "path": str(bad), "missing": "", "label": 0, "class_name": "c"}
    item |= {"train_splits": [1], "test_splits": []}
    with pytest.raises(DecodeError) as undecodable:
        P.process_video(item, make_estimator("dis"), None)
    assert P.failure_status(undecodable.value) == S.STATUS_FAILED  # the video's own problem
    try:  # a cause counts: out of memory inside a decode error is out of memory
        try:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        except OSError as e:
            raise DecodeError("decoding failed after 3 frames") from e
    except DecodeError as e:
        assert P.failure_status(e) == S.STATUS_RETRY
    s3 = OSError(
        "When reading information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION "
        "during HeadObject operation: curlCode: 7, Could not connect to server"
    )
    for e in (MemoryError(), ConnectionResetError(), TimeoutError(), s3):
        assert P.failure_status(e) == S.STATUS_RETRY, e
    for e in (FileNotFoundError(errno.ENOENT, "gone"), ValueError("x"), RuntimeError("x")):
        assert P.failure_status(e) == S.STATUS_FAILED, e


def test_full_disk_makes_retry_rows_that_a_plain_rerun_redoes(
    ray_local, small_disk: Path, tmp_path: Path
) -> None:
    """OUT on an 8 MiB disk with 160 KiB free: the small files fit, no shard does (each video's
    row is ~300 KB). Every good video is 'retry' (counted as failed), the undecodable one
    'failed'; with room again a plain rerun processes exactly the retry ones."""
    root = tmp_path / "videos"
    generate_synthetic(str(root), num_videos=6, width=320, height=240, num_frames=8)
    (root / "red_down" / "red_down_corrupt.avi").write_bytes(np.random.default_rng(0).bytes(5000))
    with open(root / "trainlist01.txt", "a") as f:
        f.write("red_down/red_down_corrupt.avi 1\r\n")
    out = small_disk / "out"
    cfg = PreprocessConfig(
        source="ucf101", root=str(root), out=str(out), flow="dis", short_side=240,
        videos_per_shard=2,
    )  # fmt: skip
    ballast = fill(small_disk, 160 * 1024)

    full = P.run_preprocess(cfg)
    assert (full.total, full.ok, full.failed, full.retry, full.processed) == (7, 0, 7, 6, 7)
    rows = {r["video_id"]: r for r in S.read_manifest(str(out)).to_pylist()}
    assert len(rows) == 7
    assert rows["red_down/red_down_corrupt"]["status"] == "failed"
    retry = {v for v, r in rows.items() if r["status"] == "retry"}
    assert len(retry) == 6
    for v in retry:
        assert "the shard could not be written" in rows[v]["error"], rows[v]
        assert "No space left on device" in rows[v]["error"], rows[v]
    assert not list((out / "shards").iterdir())  # no shard, no temp file left
    line = full.line()
    assert "6 failed for reasons not about the video (status = 'retry')" in line, line
    assert "a plain rerun processes them again" in line
    assert any("(status retry: a plain rerun processes it again)" in r for _, r in full.failures)

    ballast.unlink()
    rerun = P.run_preprocess(cfg)  # no --retry-failed
    assert (rerun.processed, rerun.skipped) == (6, 1)
    assert (rerun.ok, rerun.failed, rerun.retry) == (6, 1, 0)
    rows = {r["video_id"]: r for r in S.read_manifest(str(out)).to_pylist()}
    assert len(rows) == 7 and rows["red_down/red_down_corrupt"]["status"] == "failed"
    assert {rows[v]["status"] for v in retry} == {"ok"}
    ids = [r[S.VIDEO_ID] for r in all_rows(out)]
    assert sorted(ids) == sorted(retry)
    assert P.run_preprocess(cfg).processed == 0  # the permanent failure stays failed


# --- 3. one run per OUT -----------------------------------------------------------------------
def write_lock(out: Path, host: str, pid: int, age: float = 0.0) -> dict:
    when = (datetime.now(timezone.utc) - timedelta(seconds=age)).isoformat(timespec="seconds")
    info = {"host": host, "pid": pid, "started": when, "heartbeat": when, "token": "theirs"}
    out.mkdir(parents=True, exist_ok=True)
    (out / P.LOCK_FILE).write_text(json.dumps(info))
    return info


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_lock_refuses_the_job_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    info = write_lock(out, socket.gethostname(), os.getpid())  # this test process: alive
    run = subprocess.run(
        [*JOB, "--source", "synthetic", "--num-videos", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = own_lines(run.stderr)
    assert len(lines) == 1 and "Traceback" not in run.stderr + run.stdout, run.stderr
    assert lines[0] == (
        f"preprocess.py: error: another preprocess run works on this --out (host "
        f"{info['host']}, pid {info['pid']}, since {info['started']}): wait for it to end, "
        f"or delete {out / P.LOCK_FILE} if that run is dead"
    )
    assert json.loads((out / P.LOCK_FILE).read_text()) == info  # left as it was
    assert sorted(p.name for p in out.iterdir()) == [P.LOCK_FILE]  # no work done


def test_a_dead_runs_lock_is_taken_over_and_released(made, tmp_path: Path, caplog) -> None:
    videos, out = copy_of(made, tmp_path)
    write_lock(out, socket.gethostname(), dead_pid())
    caplog.set_level(logging.WARNING, logger="stm.data.preprocess")
    summary = P.run_preprocess(tiny(videos, out))
    assert summary.ok == 6 and summary.processed == 0
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and "is not running on this host" in taken[0], taken
    assert not (out / P.LOCK_FILE).exists()  # released at the end
    # released on errors too (here: another flow algorithm into the same OUT)
    with pytest.raises(UsageError, match="flow=dis"):
        P.run_preprocess(dataclasses.replace(tiny(videos, out), flow="farneback"))
    assert not (out / P.LOCK_FILE).exists()
    # the lock is no shard or manifest part for any reader
    assert S.list_parquet(pafs.LocalFileSystem(), str(out)) == []


def test_lock_staleness_and_heartbeat(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    fs, root = storage.resolve(str(out))
    write_lock(out, "elsewhere", 12345)  # another host, fresh: live, whatever the pid
    with pytest.raises(UsageError, match="host elsewhere, pid 12345"):
        L.RunLock(
            fs, f"{root}/{P.LOCK_FILE}", str(out / P.LOCK_FILE), "--out", "preprocess"
        ).acquire()
    write_lock(out, "elsewhere", 12345, age=L.STALE_SECONDS + 60)  # silent for too long
    monkeypatch.setattr(L, "HEARTBEAT_SECONDS", 0.05)
    lock = L.RunLock(fs, f"{root}/{P.LOCK_FILE}", str(out / P.LOCK_FILE), "--out", "preprocess")
    lock.acquire()
    try:
        held = json.loads((out / P.LOCK_FILE).read_text())
        assert (held["host"], held["pid"], held["token"]) == (
            socket.gethostname(), os.getpid(), lock.token,
        )  # fmt: skip
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):  # a second run refuses
            L.RunLock(
                fs, f"{root}/{P.LOCK_FILE}", str(out / P.LOCK_FILE), "--out", "preprocess"
            ).acquire()
        (out / P.LOCK_FILE).write_text(json.dumps({**held, "heartbeat": "2000-01-01T00:00:00"}))
        deadline = time.monotonic() + 10
        while json.loads((out / P.LOCK_FILE).read_text())["heartbeat"].startswith("2000"):
            assert time.monotonic() < deadline, "the heartbeat was not refreshed"
            time.sleep(0.02)
    finally:
        lock.release()
    assert not (out / P.LOCK_FILE).exists()
    assert not [p for p in out.iterdir()]  # no temp file left


# --- 4. a shard streamed one video at a time ----------------------------------------------------
def video_item(path: Path, video_id: str) -> dict:
    return {
        "video_id": video_id, "path": str(path), "missing": "", "label": 0, "class_name": "c",
        "train_splits": [1], "test_splits": [],
    }  # fmt: skip


def test_streamed_shard_is_the_file_write_table_atomic_writes(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    generate_synthetic(str(root), num_videos=6, num_frames=8)
    items = [video_item(p, p.stem) for p in sorted(root.glob("*/*.avi"))[:3]]
    (tmp_path / "bad.avi").write_bytes(b"not a video" * 100)
    items.insert(1, video_item(tmp_path / "bad.avi", "bad"))
    fs = pafs.LocalFileSystem()
    est = make_estimator("dis")
    results = P.process_group(fs, str(tmp_path / "out"), "part-x.parquet", items, est, None, None,
                              JPEG_QUALITY)  # fmt: skip
    assert [r[S.STATUS] for r in results] == ["ok", "failed", "ok", "ok"]
    streamed = tmp_path / "out" / "shards" / "part-x.parquet"
    meta = pq.ParquetFile(streamed).metadata
    assert (meta.num_row_groups, meta.num_rows) == (3, 3)  # a row group per video
    rows = [P.process_video(it, est, None) for it in items if it["video_id"] != "bad"]
    S.write_table_atomic(fs, str(tmp_path / "whole.parquet"), S.shard_rows(rows))
    assert streamed.read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    table = pq.read_table(streamed)
    assert table.schema.equals(S.SHARD_SCHEMA, check_metadata=False)
    assert all(S.row_problem(r) is None for r in table.to_pylist())
    col = pq.ParquetFile(streamed).metadata.row_group(0)
    codecs = {
        col.column(k).path_in_schema: col.column(k).compression for k in range(col.num_columns)
    }
    assert codecs["rgb.list.element"] == "UNCOMPRESSED" and codecs["video_id"] == "ZSTD"
    assert not [p for p in streamed.parent.iterdir() if p.name.startswith(".tmp-")]


KILLED_GROUP = """
import sys, pyarrow.fs as pafs
from stm.config import JPEG_QUALITY
from stm.data.flow import make_estimator
from stm.data.preprocess import process_group
items = [dict(video_id=v, path=p, missing="", label=0, class_name="c", train_splits=[1],
              test_splits=[]) for v, p in zip(("short", "long"), sys.argv[2:4])]
process_group(pafs.LocalFileSystem(), sys.argv[1], "part-k.parquet", items,
              make_estimator("tvl1"), None, None, JPEG_QUALITY)
"""


def test_a_kill_mid_group_leaves_only_a_temp_file_the_repair_deletes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    short, long = tmp_path / "short.avi", tmp_path / "long.avi"
    write_video(str(short), rng.integers(0, 255, size=(3, 48, 64, 3), dtype=np.uint8))
    write_video(str(long), rng.integers(0, 255, size=(400, 48, 64, 3), dtype=np.uint8))
    out = tmp_path / "out"
    script = [sys.executable, "-c", textwrap.dedent(KILLED_GROUP), str(out), str(short), str(long)]
    job = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "shards").glob(".tmp-*")):  # the short video is written
            assert job.poll() is None, job.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    left = [p.name for p in (out / "shards").iterdir()]
    assert len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith(".tmp"), left
    assert not (out / "manifest").exists() or not list((out / "manifest").iterdir())
    assert S.list_parquet(pafs.LocalFileSystem(), str(out / "shards")) == []  # no reader sees it
    fs, root = storage.resolve(str(out))
    assert P._repair(fs, root) == {}
    assert not list((out / "shards").iterdir())


# --- 5. an unreachable --out -------------------------------------------------------------------
def test_unreachable_object_store_out_is_one_line(tmp_path: Path) -> None:
    """An S3 endpoint on a closed local port: refused before any work (pyarrow's default
    retries: about 6 s)."""
    uri = "s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="dummy", AWS_SECRET_ACCESS_KEY="dummy")
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    run = subprocess.run(
        [*JOB, "--source", "synthetic", "--out", uri],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    took = time.monotonic() - start
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"preprocess.py: error: --out {uri}: "), lines
    assert "NETWORK_CONNECTION" in lines[0] or "connect" in lines[0].lower(), lines
    assert took < 30, took
    assert not list(tmp_path.iterdir())  # nothing written anywhere
