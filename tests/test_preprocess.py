"""The preprocessing job on real local Ray: shards, manifest, bad inputs, resume after SIGKILL.

Videos are tiny (48x32, 8-16 frames) and written by PyAV; flow is the default TV-L1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from stm.config import PreprocessConfig, UsageError
from stm.data import shards as S
from stm.data.preprocess import flow_actor_pool, run_preprocess
from stm.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic, write_video

from tiny import own_lines  # tests/tiny.py

REPO = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(REPO / "jobs" / "preprocess.py")]
BAD = {  # video_id -> what the reason must mention
    "red_down/red_down_corrupt": "cannot open",
    "red_up/red_up_empty": "empty file",
    "teal_up/teal_up_notes": "cannot open",
    "teal_down/teal_down_cut": "",  # truncated MP4: its index (moov) is gone
    "red_sideways/red_sideways_gone": "not found",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A UCF101-style root: 6 good synthetic videos (8 frames), 4 bad files, 1 listed but absent."""
    root = tmp_path_factory.mktemp("videos")
    generate_synthetic(str(root), num_videos=6, width=48, height=32, num_frames=8)
    rng = np.random.default_rng(0)
    (root / "red_down" / "red_down_corrupt.avi").write_bytes(rng.bytes(5000))
    (root / "red_up" / "red_up_empty.avi").write_bytes(b"")
    (root / "teal_up" / "teal_up_notes.avi").write_text("these are not frames\n" * 20)
    cut = root / "teal_down" / "teal_down_cut.mp4"
    write_video(str(cut), rng.integers(0, 255, size=(8, 32, 48, 3), dtype=np.uint8))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with open(root / "trainlist01.txt", "a") as f:
        f.write("red_down/red_down_corrupt.avi 1\r\nred_up/red_up_empty.avi 3\r\n")
        f.write("teal_up/teal_up_notes.avi 6\r\nteal_down/teal_down_cut.mp4 4\r\n")
    with open(root / "testlist01.txt", "a") as f:
        f.write("red_sideways/red_sideways_gone.avi\r\n")
    return root


def config(root: Path, out: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        source="ucf101", root=str(root), splits=str(root), out=str(out), flow="tvl1",
        short_side=24, videos_per_shard=2, **kw,
    )  # fmt: skip


def shard_ids(out: Path) -> list[str]:
    return pads.dataset(str(out / "shards"), format="parquet").to_table()["video_id"].to_pylist()


def manifest(out: Path) -> dict[str, dict]:
    rows = pads.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()
    assert len(rows) == len({r["video_id"] for r in rows}), "a video has two manifest rows"
    return {r["video_id"]: r for r in rows}


def test_shards_manifest_bad_inputs_and_rerun(ray_local, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_preprocess(config(dataset, out))
    assert (summary.total, summary.ok, summary.failed, summary.processed) == (11, 6, 5, 11)
    assert not summary.passed  # 5/11 failed > 1%
    assert summary.frames == 6 * 8

    # shards: plain Parquet, one row per good video, N frames, N-1 flow frames, resized
    table = pads.dataset(str(out / "shards"), format="parquet").to_table()
    assert sorted(table["video_id"].to_pylist()) == sorted(
        f"{c}/{c}_000" for c in SYNTHETIC_CLASSES
    )
    for row in table.to_pylist():
        assert row["num_frames"] == len(row["rgb"]) == 8
        assert len(row["flow_u"]) == len(row["flow_v"]) == 7
        assert (row["height"], row["width"], row["fps"]) == (24, 36, 25.0)
        assert row["class_name"] == SYNTHETIC_CLASSES[row["label"]]
        assert (row["train_splits"], row["test_splits"]) == ([1], [])
        assert S.decode_jpeg(row["rgb"][3]).shape == (24, 36, 3)
        assert S.decode_jpeg(row["flow_v"][6], gray=True).shape == (24, 36)
    assert table.schema.equals(S.SHARD_SCHEMA, check_metadata=False)

    # manifest: one row per input video, reasons for the failed ones, shard of the ok ones
    rows = manifest(out)
    assert len(rows) == 11
    for vid, needle in BAD.items():
        assert rows[vid]["status"] == "failed" and rows[vid]["shard"] == ""
        assert needle in rows[vid]["error"] and rows[vid]["error"]
    for vid in shard_ids(out):
        assert rows[vid]["status"] == "ok" and (out / "shards" / rows[vid]["shard"]).exists()
    assert json.loads((out / "classes.json").read_text()) == list(SYNTHETIC_CLASSES)
    # stm's readers say the same
    assert S.read_classes(str(out)) == list(SYNTHETIC_CLASSES)
    assert S.read_manifest(str(out)).num_rows == 11
    t = S.shards_dataset(str(out)).to_table(columns=[S.VIDEO_ID, S.TRAIN_SPLITS, S.TEST_SPLITS])
    assert t.num_rows == 6 and S.in_split(t, 1, train=True).all()
    assert not S.in_split(t, 1, train=False).any()
    info = S.read_dataset_info(str(out))
    assert (info["source"], info["flow"], info["short_side"], info["num_splits"]) == (
        "ucf101", "tvl1", 24, 1,
    )  # fmt: skip
    assert info["counts"] == {"videos": 11, "ok": 6, "failed": 5}

    # damage of the kind an interruption leaves: a temp file, an unreadable shard, a shard whose
    # manifest part was never written. A rerun repairs it all and computes no flow.
    parts = {r["shard"] for r in rows.values()} - {""}
    all_ok = [
        p
        for p in parts
        if all(r["status"] == "ok" for r in pq.read_table(out / "manifest" / p).to_pylist())
    ]
    (out / "manifest" / all_ok[0]).unlink()
    (out / "shards" / ".tmp-0123-part-x.parquet").write_bytes(b"half a file")
    (out / "shards" / "part-broken.parquet").write_bytes(b"not parquet")
    again = run_preprocess(config(dataset, out))
    assert (again.processed, again.skipped, again.ok, again.failed) == (0, 11, 6, 5)
    assert manifest(out).keys() == rows.keys()
    assert not list((out / "shards").glob(".tmp-*"))
    assert (out / "unreadable" / "shards-part-broken.parquet").exists()

    # the job's exit status follows --max-failures; failures are printed one per line
    cli = [*JOB, "--source", "ucf101", "--root", str(dataset), "--splits", str(dataset)]
    cli += ["--out", str(out), "--short-side", "24"]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "failed: red_up/red_up_empty: empty file (0 bytes)" in run.stdout
    assert "videos ok 6, failed 5 of 11" in run.stdout and "nothing left to do" in run.stdout
    run = subprocess.run([*cli, "--max-failures", "0.5"], capture_output=True, timeout=120)
    assert run.returncode == 0

    # --retry-failed works on the failed videos again (and they fail again)
    retried = run_preprocess(config(dataset, out, retry_failed=True))
    assert (retried.processed, retried.ok, retried.failed) == (5, 6, 5)
    assert manifest(out).keys() == rows.keys()
    assert sorted(shard_ids(out)) == sorted(set(shard_ids(out)))

    # a different flow algorithm into the same OUT is refused
    with pytest.raises(UsageError, match="flow=tvl1"):
        run_preprocess(dataclasses.replace(config(dataset, out), flow="dis"))


USAGE_ERRORS = [
    (["--source", "kinetics", "--root", "."], "invalid choice: 'kinetics'"),
    (["--source", "folder", "--root", "/no/such/dir"], "is not an existing directory"),
    (["--source", "ucf101", "--root", "."], "classInd.txt not found"),
    (["--source", "synthetic", "--flow", "raft"], "invalid choice: 'raft'"),
    (["--source", "synthetic", "--short-side"], "expected one argument"),
]


@pytest.mark.parametrize("args,message", USAGE_ERRORS)
def test_usage_errors_are_one_line_with_status_2(args, message, tmp_path: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_job", JOB[1])
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    try:
        status = job.main([*args, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    lines = own_lines(capsys.readouterr().err)  # not an earlier test's actors' logs
    assert len(lines) == 1 and message in lines[0], lines


def test_usage_error_of_the_process(tmp_path: Path) -> None:
    """The real process: one line on stderr, status 2, no traceback."""
    args, message = USAGE_ERRORS[0]
    run = subprocess.run(
        [*JOB, *args, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"preprocess.py: error: argument --source: {message} "
        "(choose from 'ucf101', 'hmdb51', 'folder', 'synthetic')"
    )


def test_killed_driver_resumes_without_duplicates(ray_local, tmp_path: Path) -> None:
    """SIGKILL the job's driver mid-run, rerun the same command: every video exactly once,
    every file readable, finished videos not recomputed; a third run does no flow work."""
    root = tmp_path / "videos"
    generate_synthetic(str(root), num_videos=6, width=48, height=32, num_frames=12)
    out = tmp_path / "out"
    cmd = [*JOB, "--source", "ucf101", "--root", str(root), "--out", f"file://{out}"]  # a URI
    cmd += ["--short-side", "32", "--videos-per-shard", "1", "--workers", "2"]
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,  # the test session's cluster
        RAY_AUTH_MODE="token",
    )
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "shards").glob("part-*.parquet"))) < 2:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}
    assert 2 <= len(before) < 6

    # the rerun sizes its own pool (2 CPUs, up to one actor per group): it may grow, and Ray
    # Data has nothing to warn about it
    rerun = [c for c in cmd if c not in ("--workers", "2")]
    run = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(before)} were already done" in run.stdout
    assert "up to" in run.stderr + run.stdout, run.stderr
    assert "will not allow it to scale up" not in run.stdout + run.stderr
    ids = shard_ids(out)
    assert len(ids) == 6 and Counter(ids).most_common(1)[0][1] == 1
    for path in (out / "shards").glob("*.parquet"):
        pq.read_table(path)  # readable
    for name, mtime in before.items():  # finished videos were not redone
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    rows = manifest(out)
    assert len(rows) == 6 and {r["status"] for r in rows.values()} == {"ok"}

    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "nothing left to do (6 already done)" in run.stdout
    logs = run.stdout + run.stderr
    assert "Starting execution of Dataset" not in logs and "Ray instance" not in logs


def test_growing_flow_actor_pool_starts_small_and_grows(ray_local) -> None:
    """The pool preprocessing builds without --workers on a cluster with one CPU at rest (an
    autoscaling cluster's head): it starts with one actor and grows while groups wait, up to
    what the cluster holds (2 CPUs here; the stand-ins take a quarter CPU each, so that the
    pool's growth, not the test session's other work, decides how many run)."""

    class Slow:  # a flow actor's stand-in: a second per group, and which actor did it
        def __call__(self, row: dict) -> dict:
            time.sleep(1.0)
            return {"pid": os.getpid()}

    pool, how = flow_actor_pool(None, 0.0, 8, {"CPU": 1.0})
    assert how == "1 (up to 8 as the cluster grows)"
    ds = ray_local.data.from_items([{"group": i} for i in range(8)], override_num_blocks=8)
    rows = ds.map(Slow, compute=pool, num_cpus=0.25).take_all()
    assert len(rows) == 8
    assert len({r["pid"] for r in rows}) >= 2
    fixed, how = flow_actor_pool(3, 0.0, 8, {"CPU": 1.0})
    assert how == "3"


def test_shards_of_a_many_class_dataset_are_not_one_class_each() -> None:
    """Listings come sorted by class; the shard order mixes them (101 classes x 8 videos,
    shards of 8: about 7.7 classes per shard for a random order, 1 for the listing's)."""
    from stm.data.preprocess import shard_order
    from stm.data.sources import VideoItem

    items = [
        VideoItem(f"c{c:03d}/v{i}", "", c, f"c{c:03d}", (1,), ())
        for c in range(101)
        for i in range(8)
    ]
    order = shard_order(items)
    assert sorted(it.video_id for it in order) == [it.video_id for it in items]
    classes = [len({it.label for it in order[s : s + 8]}) for s in range(0, len(order), 8)]
    assert np.mean(classes) > 7.2 and min(classes) >= 4
    assert shard_order(list(reversed(items))) == order  # a fixed order, whatever the listing's


def test_jpeg_quality_95_for_new_datasets_the_recorded_one_when_continuing(tmp_path: Path) -> None:
    from stm import storage
    from stm.data.preprocess import _with_jpeg_quality

    cfg = PreprocessConfig(out=str(tmp_path))
    fs, root = storage.resolve(str(tmp_path))
    assert _with_jpeg_quality(fs, root, cfg).jpeg_quality == 95
    (tmp_path / "dataset.json").write_text(json.dumps({"flow": "tvl1", "jpeg_quality": 90}))
    assert _with_jpeg_quality(fs, root, cfg).jpeg_quality == 90
    (tmp_path / "dataset.json").write_text(json.dumps({"flow": "tvl1"}))  # before it was recorded
    assert _with_jpeg_quality(fs, root, cfg).jpeg_quality == 90
    explicit = dataclasses.replace(cfg, jpeg_quality=75)
    assert _with_jpeg_quality(fs, root, explicit).jpeg_quality == 75
