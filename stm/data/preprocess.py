"""Videos to training shards on Ray Data: decode, optical flow, JPEG, Parquet; resumable.

The driver lists the input videos, works out what earlier runs already finished, cuts the rest
into groups of ``videos_per_shard`` and streams the groups through a pool of flow actors (one CPU
and one OpenCV thread each, so N cores work on N videos). Each actor decodes its group's videos,
computes flow, encodes JPEGs and streams each video into the group's shard file as its own row
group as soon as it is done (so an actor holds one video's row at a time), then writes the
group's manifest part, straight to ``OUT`` (local disk or ``s3://...`` through pyarrow), each
appearing only once complete and under a name derived from the group's video ids. The driver
only sees one small result row per video.

Resume: a video is done when a shard holds it (ok) or a manifest part says it failed. On start the
driver deletes temp leftovers, sets unreadable files aside, removes duplicates and repairs the
manifest from the shards (a kill between a shard and its manifest part loses nothing); then only
the videos not done are processed. Killing the driver or a worker at any moment is safe: Ray
retries a lost group on another actor (same file names), and a rerun picks up where it stopped.

Failures: a video that cannot be processed (it does not decode, ...) is recorded as ``failed`` and
redone only with ``--retry-failed``; one that failed for a reason not about the video (its group's
task was lost, a full disk, out of memory, a network error: ``failure_status``) is recorded as
``retry``, counts as failed in the run's summary, and a plain rerun processes it again.

``--verify`` first checks every row of every shard (one Ray task per shard file,
``shards.row_problem``: every JPEG against its checksum), removes the videos that fail from their
shards and processes them again.

One run per ``OUT`` at a time: a run holds ``OUT/_preprocess.lock`` (host, pid, start, a heartbeat
refreshed every 30 s) and a second run refuses to start while it is live; a lock whose pid is gone
(same host) or whose heartbeat is older than 5 minutes is taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stm import storage
from stm.config import JPEG_QUALITY, JPEG_QUALITY_BEFORE, PreprocessConfig, UsageError
from stm.data import shards as S
from stm.data.decode import DecodeError, VideoReader, resized_shape
from stm.data.flow import consecutive_pairs, iter_flows, make_estimator, quantize_flow
from stm.data.sources import Listing, VideoItem, list_videos
from stm.data.synthetic import generate_synthetic
from stm.locks import RunLock, first_line

logger = logging.getLogger(__name__)

__all__ = [
    "PreprocessSummary",
    "failure_status",
    "flow_actor_pool",
    "process_video",
    "process_video_sparse",
    "run_preprocess",
]

MAX_BLOCKS = 1000  # cap on Ray Data blocks (each block holds one or more groups)
MAX_TASK_RETRIES = 3  # a killed actor is restarted and its group retried, 3 times at most
LOST_REASON = "no result: the task of its group failed (see the Ray logs)"
LOCK_FILE = "_preprocess.lock"  # OUT/_preprocess.lock: the run working on OUT (stm.locks.RunLock)


@dataclass
class PreprocessSummary:
    """The outcome of a run. Counts cover every listed video, including earlier runs' work."""

    total: int  # videos listed by the source
    ok: int
    failed: int
    skipped: int  # already done (ok or failed) before this run
    processed: int  # videos this run worked on
    frames: int  # RGB frames decoded by this run
    seconds: float  # wall time of this run
    pipeline_seconds: float  # of which the Ray Data pipeline (actor start-up included)
    out: str
    shards: str  # OUT/shards
    manifest: str  # OUT/manifest
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video_id, reason), first 20
    max_failures: float = 0.01
    worker_seconds: float = 0.0  # summed over videos: decode + flow + JPEG + write, in the actors
    worker_cpu_seconds: float = 0.0  # the CPU time of the same (the actor process, all threads)
    retry: int = 0  # of the failed: status retry (not about the video: a plain rerun redoes them)
    verified: int | None = None  # stored videos checked by --verify (None: no --verify)
    verify_failed: int = 0  # of which failed verification: removed and processed again

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.total if self.total else 0.0

    @property
    def passed(self) -> bool:
        """Whether the failed fraction is within ``max_failures`` (the job's exit status)."""
        return self.failed_fraction <= self.max_failures

    def line(self) -> str:
        """The one-line summary the job prints."""
        rate = self.frames / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0
        text = (
            f"videos ok {self.ok}, failed {self.failed} of {self.total} "
            f"({100 * self.failed_fraction:.1f}%, limit {100 * self.max_failures:.1f}%); "
        )
        if self.verified is not None:
            text += f"verified {self.verified} stored videos: "
            if self.verify_failed:
                were = "was" if self.verify_failed == 1 else "were"
                text += f"{self.verify_failed} failed verification and {were} processed again; "
            else:
                text += "all intact; "
        if self.processed:
            text += (
                f"this run: {self.processed} videos, {self.frames} frames, {rate:.1f} frames/s "
                f"({self.pipeline_seconds:.1f} s of pipeline, {self.seconds:.1f} s in all), "
                f"{self.skipped} were already done; "
            )
        else:
            text += f"nothing left to do ({self.skipped} already done); "
            if self.verified is None:
                text += "--verify checks every stored JPEG against its checksum; "
        text += f"shards: {self.shards}"
        if self.failed and not self.retry:
            text += f"; failures: {self.manifest} (status = 'failed')"
        elif self.failed:
            text += (
                f"; failures: {self.manifest} (status = 'failed' or 'retry'); {self.retry} "
                "failed for reasons not about the video (status = 'retry'): a plain rerun "
                "processes them again"
            )
        return text


# --- per video (plain Python: runs inside the flow actors, and in tests and benchmarks) ------
MAX_LONG_SIDE = PreprocessConfig.max_long_side  # the default bound on a frame's long side


def process_video(
    item: dict,
    estimator,
    short_side: int | None,
    max_frames: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
    max_long_side: int | None = MAX_LONG_SIDE,
) -> dict:
    """Decode one video, compute flow between consecutive frames, return its shard row.

    ``item`` is a ``VideoItem`` as a dict. Frames stream through one at a time: each is resized
    (short side ``short_side``, long side at most ``max_long_side``), JPEG-encoded and turned
    into grayscale, and flow k (frame k -> k + 1) is computed as soon as frame k + 1 is there,
    quantised and JPEG-encoded; only the JPEG bytes are kept. So the memory of a video is its
    encoded row plus O(1) frames: one previous frame for a pairwise estimator, one batch of
    pairs and their flows for a batched one (tvl1-torch, ``stm.data.flow.iter_flows``).
    Raises ``DecodeError`` (or anything OpenCV raises) for a video that cannot be processed.
    """
    if item["missing"]:
        raise DecodeError(item["missing"])
    rgb, flow_u, flow_v = [], [], []
    shape = (0, 0)
    with VideoReader(item["path"]) as video:

        def grays():
            nonlocal shape
            for frame in video.frames(short_side, max_frames, max_long_side):  # (H, W, 3) RGB
                if not rgb:
                    _warn_if_bounded(item, video, frame, short_side, max_long_side)
                rgb.append(S.encode_jpeg(frame, jpeg_quality))
                shape = frame.shape[:2]
                yield cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)

        for flow in iter_flows(estimator, consecutive_pairs(grays())):  # flow k: k -> k + 1
            u, v = quantize_flow(flow)
            flow_u.append(S.encode_jpeg(u, jpeg_quality))
            flow_v.append(S.encode_jpeg(v, jpeg_quality))
        fps = video.fps
    if len(rgb) < 2:
        raise DecodeError(f"only {len(rgb)} frame: flow needs at least 2")
    return _row(item, len(rgb), fps, shape, rgb, flow_u, flow_v)


def process_video_sparse(
    item: dict,
    estimator,
    short_side: int | None,
    select: Callable[[int], tuple[Iterable[int], Iterable[int]]],
    max_frames: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
    max_long_side: int | None = MAX_LONG_SIDE,
) -> dict:
    """``process_video``'s row with only the frames ``select`` asks for, the flow of no other.

    ``select(num_frames)`` -> (RGB frame indices, flow indices) of a video of ``num_frames``
    frames (flow k: frame k -> k + 1, 0 <= k < num_frames - 1). The video is decoded twice:
    once to count its frames (decoded, never converted: the container's count is never used),
    then up to the last frame needed, converting only frames k and k + 1 of each flow k and
    the RGB frames asked for. The row's ``rgb``, ``flow_u`` and ``flow_v`` are dicts
    index -> JPEG bytes holding exactly the indices asked for, each the bytes ``process_video``
    gives it (the same decode, resize, flow, quantisation and JPEG; for a batched estimator the
    flow of a pair does not depend on its batch up to float rounding); ``num_frames``, ``fps``,
    ``height`` and ``width`` are the whole video's. So its flow costs the pairs asked for, not
    the video's length (the test protocol: 25 stacks of 10 flows, ``stm.train.predict``).
    """
    if item["missing"]:
        raise DecodeError(item["missing"])
    with VideoReader(item["path"]) as video:
        n = video.count_frames(max_frames)
        fps = video.fps
    if n < 2:
        raise DecodeError(f"only {n} frame: flow needs at least 2")
    rgb_wanted, flow_wanted = (sorted({int(k) for k in ks}) for ks in select(n))
    bad = [k for k in rgb_wanted if not 0 <= k < n] + [k for k in flow_wanted if not 0 <= k < n - 1]
    if bad:
        raise ValueError(f"frame or flow indices {bad[:5]} outside a video of {n} frames")
    rgb_set, flow_set = set(rgb_wanted), set(flow_wanted)
    gray_set = flow_set | {k + 1 for k in flow_wanted}  # the frames of the flows' pairs
    rgb: dict[int, bytes] = {}
    flow_u: dict[int, bytes] = {}
    flow_v: dict[int, bytes] = {}
    order: list[int] = []  # the flow index of each pair sent, in order
    shape = (0, 0)
    with VideoReader(item["path"]) as video:

        def pairs():
            nonlocal shape
            prev_k, prev = -1, None
            for k, frame in video.frames_at(rgb_set | gray_set, short_side, max_long_side):
                if not shape[0]:
                    _warn_if_bounded(item, video, frame, short_side, max_long_side)
                shape = frame.shape[:2]
                if k in rgb_set:
                    rgb[k] = S.encode_jpeg(frame, jpeg_quality)
                if k in gray_set:
                    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
                    if k - 1 in flow_set and prev_k == k - 1:
                        order.append(k - 1)
                        yield prev, gray
                    prev_k, prev = k, gray

        for i, flow in enumerate(iter_flows(estimator, pairs())):
            u, v = quantize_flow(flow)
            flow_u[order[i]] = S.encode_jpeg(u, jpeg_quality)
            flow_v[order[i]] = S.encode_jpeg(v, jpeg_quality)
    if len(rgb) != len(rgb_wanted) or len(flow_u) != len(flow_wanted):
        raise DecodeError(f"the second decoding of the video ended before its {n} frames")
    return _row(item, n, fps, shape, rgb, flow_u, flow_v)


def _row(item: dict, n: int, fps: float, shape, rgb, flow_u, flow_v) -> dict:
    return {
        S.VIDEO_ID: item["video_id"],
        S.LABEL: item["label"],
        S.CLASS_NAME: item["class_name"],
        S.NUM_FRAMES: n,
        S.FPS: fps,
        S.HEIGHT: shape[0],
        S.WIDTH: shape[1],
        S.RGB: rgb,
        S.FLOW_U: flow_u,
        S.FLOW_V: flow_v,
        S.TRAIN_SPLITS: list(item["train_splits"]),
        S.TEST_SPLITS: list(item["test_splits"]),
    }


def _warn_if_bounded(
    item: dict, video: VideoReader, frame: np.ndarray, short_side: int | None, bound: int | None
) -> None:
    """One warning for a video whose frames the long-side bound made smaller than
    ``short_side`` alone would have."""
    h, w = video.source_shape or frame.shape[:2]
    if frame.shape[:2] != resized_shape(h, w, short_side):
        logger.warning(
            "%s: frames of %dx%d resized to %dx%d, not %dx%d: the long side is bounded to %d "
            "(--max-long-side)",
            item["video_id"],
            w,
            h,
            frame.shape[1],
            frame.shape[0],
            *resized_shape(h, w, short_side)[::-1],
            bound,
        )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, DecodeError) else f"{type(e).__name__}: {text}"[:500]


class GroupWorker:
    """A flow actor: one estimator, one OpenCV thread; processes and writes one group per call."""

    def __init__(
        self,
        out: str,
        flow: str,
        short_side: int | None,
        max_frames: int | None,
        jpeg_quality: int,
        max_long_side: int = MAX_LONG_SIDE,
    ) -> None:
        cv2.setNumThreads(1)
        self.estimator = make_estimator(flow)
        self.fs, self.root = storage.resolve(out)
        self.short_side, self.max_frames, self.jpeg_quality = short_side, max_frames, jpeg_quality
        self.max_long_side = max_long_side

    def __call__(self, group: dict) -> list[dict]:
        return process_group(
            self.fs,
            self.root,
            group["name"],
            json.loads(group["videos"]),
            self.estimator,
            self.short_side,
            self.max_frames,
            self.jpeg_quality,
            self.max_long_side,
        )


def process_group(
    fs: pafs.FileSystem,
    root: str,
    name: str,
    videos: Sequence[dict],
    estimator,
    short_side: int | None,
    max_frames: int | None,
    jpeg_quality: int,
    max_long_side: int = MAX_LONG_SIDE,
) -> list[dict]:
    """Process a group of videos into its shard file, then write its manifest part; return
    the results.

    Each ok video is written to the shard as its own row group as soon as it is processed
    (``shards.ParquetStreamWriter``; the shard appears only once complete), so at most one
    video's row is held. A per-video error becomes a failed row, or a retry row when it is not
    about the video (``failure_status``): a failing video never fails the group. When the shard
    cannot be written (a full disk, a network error), the group's ok videos and the ones not
    processed yet become retry rows. Each result carries the wall and CPU seconds of its video
    (and its write); the last one also those of the shard's commit and the manifest part.
    """
    results: list[dict] = []
    shard = S.ParquetStreamWriter(fs, posixpath.join(root, S.SHARDS_DIR, name))
    write_error = ""  # why the shard could not be written
    for item in videos:
        start, cpu = time.perf_counter(), time.process_time()
        status, error, frames, table = S.STATUS_OK, "", 0, None
        if write_error:
            status, error = S.STATUS_RETRY, write_error  # no shard to put it in: not processed
        else:
            try:
                row = process_video(
                    item, estimator, short_side, max_frames, jpeg_quality, max_long_side
                )
                frames = row[S.NUM_FRAMES]
                table = S.shard_rows([row])
                del row  # the table holds a copy of its bytes
            except Exception as e:  # noqa: BLE001 - any per-video error is recorded, not raised
                status, error = failure_status(e), _one_line(e)
                logger.warning("%s failed: %s", item["video_id"], error)
        if table is not None:
            try:
                shard.write(table)
            except Exception as e:  # noqa: BLE001 - recorded as retry rows for the whole group
                write_error = f"the shard could not be written: {_one_line(e)}"
                logger.warning("%s: %s", name, write_error)
                shard.abort()
            del table
        results.append(
            {
                S.VIDEO_ID: item["video_id"],
                S.STATUS: status,
                S.ERROR: error,
                S.SHARD: "",
                "num_frames": frames,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu,
            }
        )
    start, cpu = time.perf_counter(), time.process_time()
    if not write_error:
        try:
            shard.commit()
        except Exception as e:  # noqa: BLE001 - recorded as retry rows for the whole group
            write_error = f"the shard could not be written: {_one_line(e)}"
            logger.warning("%s: %s", name, write_error)
    for r in results:
        if r[S.STATUS] == S.STATUS_OK:
            if write_error:
                r[S.STATUS], r[S.ERROR] = S.STATUS_RETRY, write_error
            else:
                r[S.SHARD] = name
    _write_manifest(fs, root, name, results)
    results[-1]["seconds"] += time.perf_counter() - start
    results[-1]["cpu_seconds"] += time.process_time() - cpu
    return results


# errno values of failures that are not about the video: no space or quota, no memory, too many
# open files, a network or remote filesystem error
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC", "EDQUOT", "ENOMEM", "EMFILE", "ENFILE", "ETIMEDOUT", "ECONNRESET",
        "ECONNREFUSED", "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN",
        "EHOSTUNREACH", "ESTALE", "EREMOTEIO",
    )
    if hasattr(errno, name)
)  # fmt: skip
# what pyarrow's object store errors (no errno) say when the network or the service failed
TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE", "Connection reset", "Could not connect", "timed out",
)  # fmt: skip


def failure_status(error: BaseException) -> str:
    """``STATUS_RETRY`` for a failure not about the video itself, else ``STATUS_FAILED``.

    Not about the video: ``MemoryError``; ``ConnectionError`` and ``TimeoutError``; an
    ``OSError`` whose errno is in ``TRANSIENT_ERRNOS`` (a full disk: ENOSPC, EDQUOT; a network
    error) or, for an object store's error (no errno), whose message says the network or the
    service failed (``TRANSIENT_MARKERS``). The exception's causes count too (a ``DecodeError``
    raised from ENOMEM is out of memory, one raised from a missing file is the video's).
    """
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 10:
        if isinstance(e, (MemoryError, ConnectionError, TimeoutError)):
            return S.STATUS_RETRY
        if isinstance(e, OSError):
            if e.errno in TRANSIENT_ERRNOS:
                return S.STATUS_RETRY
            if e.errno is None and any(m in str(e) for m in TRANSIENT_MARKERS):
                return S.STATUS_RETRY
        e, seen = e.__cause__ or e.__context__, seen + 1
    return S.STATUS_FAILED


def _write_manifest(fs: pafs.FileSystem, root: str, name: str, rows: Sequence[dict]) -> None:
    table = pa.Table.from_pylist(
        [{k: r[k] for k in S.MANIFEST_SCHEMA.names} for r in rows], schema=S.MANIFEST_SCHEMA
    )
    S.write_table_atomic(fs, posixpath.join(root, S.MANIFEST_DIR, name), table)


def group_name(video_ids: Sequence[str], prefix: str = "part") -> str:
    """A file name determined by the group's videos: a retried group overwrites its own files."""
    digest = hashlib.sha1("\n".join(sorted(video_ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


# --- driver ------------------------------------------------------------------------------------
def run_preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Preprocess ``cfg.source`` into ``cfg.out``; resume whatever an earlier run left.

    Uses the Ray instance that is already initialised, or starts a local one. Starts nothing when
    every video is already done (and no ``verify``). Holds ``OUT/_preprocess.lock`` while it runs
    (``RunLock``). Raises ``UsageError`` for bad arguments or inputs, an unreachable ``--out``,
    or another live run on the same ``OUT``.
    """
    start = time.perf_counter()
    _validate(cfg)
    fs, root = storage.resolve(cfg.out)
    lock = RunLock(
        fs, posixpath.join(root, LOCK_FILE), storage.join(cfg.out, LOCK_FILE), "--out", "preprocess"
    )
    lock.acquire()
    try:
        return _run_locked(cfg, fs, root, start)
    finally:
        lock.release()


def _run_locked(
    cfg: PreprocessConfig, fs: pafs.FileSystem, root: str, start: float
) -> PreprocessSummary:
    cfg = _with_jpeg_quality(fs, root, cfg)
    listing = _listing(cfg)
    _check_and_write_metadata(fs, root, cfg, listing)

    verified, corrupt = None, set()
    if cfg.verify:  # before the repair: it makes the manifest agree with what remains
        verified, corrupt = _verify(cfg, fs, root)
    shard_of = _repair(fs, root)  # video_id -> shard file name
    manifest = _manifest_status(fs, root)  # video_id -> (status, error)
    failed_before = {v for v, (status, _) in manifest.items() if status == S.STATUS_FAILED}
    drop = {v for v, (status, _) in manifest.items() if status == S.STATUS_RETRY}
    if cfg.retry_failed:
        drop |= failed_before
    if drop:  # their rows go: the new results replace them
        _rewrite_manifest(fs, root, shard_of, drop=drop)
    done = set(shard_of) | (failed_before - drop)
    todo = [it for it in listing.items if it.video_id not in done]
    skipped = len(listing.items) - len(todo)
    logger.info(
        "%d videos listed, %d already done, %d to do", len(listing.items), skipped, len(todo)
    )

    missing = [it for it in todo if it.missing]
    if missing:  # no worker needed to know these fail
        _write_manifest(
            fs,
            root,
            group_name([it.video_id for it in missing], "missing"),
            [_failed_row(it.video_id, it.missing) for it in missing],
        )
    todo = shard_order([it for it in todo if not it.missing])
    stats = {}
    if todo:
        stats = _run_pipeline(cfg, fs, root, todo)
        try:
            _repair(fs, root)
        except OSError as e:  # a full disk, a network error: the next run repairs it
            logger.warning("could not tidy %s after the run (a rerun does): %s", cfg.out, e)

    summary = _summarise(fs, root, cfg, listing, skipped, len(todo) + len(missing), start)
    summary = dataclasses.replace(summary, **stats, verified=verified, verify_failed=len(corrupt))
    try:
        info = storage.read_json(fs, posixpath.join(root, S.DATASET_FILE)) or {}
        info["counts"] = {"videos": summary.total, "ok": summary.ok, "failed": summary.failed}
        storage.write_json_atomic(fs, posixpath.join(root, S.DATASET_FILE), info)
    except OSError as e:
        logger.warning("could not record the counts in %s: %s", S.DATASET_FILE, e)
    logger.info("%s", summary.line())
    return summary


def shard_order(items: Sequence[VideoItem]) -> list[VideoItem]:
    """The videos in a fixed pseudo-random order (by a hash of their ids), so that the shards
    cut from it in groups of ``videos_per_shard`` mix classes. Listings are sorted by class:
    cut in that order, every shard would hold one class, and an epoch that shuffles shards
    and a buffer would still feed BatchNorm and each update a few classes at a time."""
    return sorted(
        items, key=lambda it: hashlib.sha1(f"shard-order:{it.video_id}".encode()).digest()
    )


def _with_jpeg_quality(fs: pafs.FileSystem, root: str, cfg: PreprocessConfig) -> PreprocessConfig:
    """An unset ``jpeg_quality``: the quality a dataset being continued recorded (90 when it
    predates the field), else 95 for a new one."""
    if cfg.jpeg_quality is not None:
        return cfg
    old = storage.read_json(fs, posixpath.join(root, S.DATASET_FILE))
    quality = JPEG_QUALITY if old is None else int(old.get("jpeg_quality") or JPEG_QUALITY_BEFORE)
    return dataclasses.replace(cfg, jpeg_quality=quality)


def _validate(cfg: PreprocessConfig) -> None:
    """What the config cannot check by itself: that ``--out`` names a reachable place. A cheap
    real access (the root's info; for a new dataset, making its folder) finds an unreachable or
    forbidden object store, or an unwritable path, before any work."""
    try:
        fs, root = storage.resolve(cfg.out)
    except (OSError, ValueError) as e:
        raise UsageError(f"--out {cfg.out}: {first_line(e)}") from e
    try:
        kind = fs.get_file_info(root).type
        if kind == pafs.FileType.NotFound:
            fs.create_dir(root, recursive=True)
        elif kind != pafs.FileType.Directory:
            raise UsageError(f"--out {cfg.out}: not a folder")
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"--out {cfg.out}: {first_line(e)}") from e


def _listing(cfg: PreprocessConfig) -> Listing:
    if cfg.source != "synthetic":
        return list_videos(cfg.source, cfg.root, cfg.splits)
    root = cfg.root or storage.join(cfg.out, "videos")
    kwargs = {
        "num_videos": cfg.num_videos,
        "seed": cfg.seed,
        "width": cfg.synthetic_width,
        "height": cfg.synthetic_height,
        "num_frames": cfg.synthetic_frames,
    }
    fs, path = storage.resolve(root)
    if isinstance(fs, pafs.LocalFileSystem):
        generate_synthetic(path, **kwargs)
    else:  # generate locally, then upload: workers read the videos from shared storage
        local = tempfile.mkdtemp(prefix="stm-synthetic-")
        try:
            generate_synthetic(local, **kwargs)
            pafs.copy_files(local, path, destination_filesystem=fs)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return list_videos("synthetic", root)


def _check_and_write_metadata(
    fs: pafs.FileSystem, root: str, cfg: PreprocessConfig, listing: Listing
) -> None:
    """Refuse to mix datasets in one OUT; write classes.json and dataset.json."""
    settings = {
        "source": cfg.source,
        "flow": cfg.flow,
        "short_side": cfg.resolved_short_side(),
        "max_frames": cfg.max_frames,
        "jpeg_quality": cfg.jpeg_quality,
        "num_splits": listing.num_splits,
        "max_long_side": cfg.max_long_side,
    }
    old = storage.read_json(fs, posixpath.join(root, S.DATASET_FILE))
    if old is not None:
        # datasets written before the long side was bounded: its default (only frames wider
        # than 4:1 at short side 256 would differ)
        old = {"max_long_side": MAX_LONG_SIDE, **old}
        diff = [k for k, v in settings.items() if old.get(k) != v]
        if diff:
            was = ", ".join(f"{k}={old.get(k)}" for k in diff)
            raise UsageError(
                f"{cfg.out} was prepared with {was}: use the same options or another --out"
            )
    old_classes = storage.read_json(fs, posixpath.join(root, S.CLASSES_FILE))
    if old_classes is not None and list(old_classes) != list(listing.classes):
        raise UsageError(f"{cfg.out} holds another class list (classes.json): use another --out")
    fs.create_dir(posixpath.join(root, S.SHARDS_DIR), recursive=True)
    fs.create_dir(posixpath.join(root, S.MANIFEST_DIR), recursive=True)
    storage.write_json_atomic(fs, posixpath.join(root, S.CLASSES_FILE), list(listing.classes))
    info = dict(
        old or {}, **settings, classes=len(listing.classes), root=cfg.root, splits=cfg.splits
    )
    info.setdefault("counts", {})
    info["shard_columns"] = S.SHARD_SCHEMA.names
    storage.write_json_atomic(fs, posixpath.join(root, S.DATASET_FILE), info)


def _failed_row(video_id: str, reason: str, status: str = S.STATUS_FAILED) -> dict:
    return {S.VIDEO_ID: video_id, S.STATUS: status, S.ERROR: reason, S.SHARD: ""}


GROWING_IN_FLIGHT = 2  # groups in flight per actor of a growing pool (flow_actor_pool)


def flow_actor_pool(
    workers: int | None,
    gpus_per_worker: float,
    num_groups: int,
    resources: dict[str, float],
) -> tuple[Any, str]:
    """The flow actors' ``ActorPoolStrategy`` and a description of it for the log.

    ``workers`` fixes the pool. Without it the pool starts with what the cluster has now
    (``resources``: its CPUs, or GPUs / ``gpus_per_worker``) and grows to one actor per group:
    on an autoscaling cluster (no workers at rest) the pending actors make the autoscaler add
    nodes; on a fixed cluster no more actors start than its resources allow.

    A growing pool takes two groups in flight per actor. Ray Data grows a pool when its
    utilisation (tasks in flight per actor slot) passes 175%; with one in flight it never
    passes 100%, so the pool would stay at its first size (and Ray Data warns that it "will not
    allow it to scale up"). The second group waits in the actor's queue: at the end of a run
    one actor may still hold one queued group while another is idle.
    """
    import ray

    if workers:
        size = min(workers, num_groups)
    else:
        if gpus_per_worker > 0:
            now = int(resources.get("GPU", 0) / gpus_per_worker)
        else:
            now = int(resources.get("CPU", 1))
        size = min(max(1, now), num_groups)
    if workers or size == num_groups:  # fixed, or nothing to grow into: one group per actor
        return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1), f"{size}"
    pool = ray.data.ActorPoolStrategy(
        min_size=size, max_size=num_groups, max_tasks_in_flight_per_actor=GROWING_IN_FLIGHT
    )
    return pool, f"{size} (up to {num_groups} as the cluster grows)"


def _run_pipeline(
    cfg: PreprocessConfig, fs: pafs.FileSystem, root: str, todo: Sequence[VideoItem]
) -> dict:
    """Run the Ray Data pipeline over ``todo``.

    Returns the run's ``PreprocessSummary`` fields: frames, pipeline_seconds, worker_seconds and
    worker_cpu_seconds.
    """
    import ray
    from ray.util.annotations import RayDeprecationWarning

    _ensure_ray()
    groups = [todo[i : i + cfg.videos_per_shard] for i in range(0, len(todo), cfg.videos_per_shard)]
    rows = [
        {
            "name": group_name([it.video_id for it in g]),
            "videos": json.dumps([asdict(it) for it in g]),
        }
        for g in groups
    ]
    pool, how = flow_actor_pool(
        cfg.workers, cfg.gpus_per_worker, len(groups), ray.cluster_resources()
    )
    logger.info(
        "%d groups of up to %d videos on %s flow actors", len(groups), cfg.videos_per_shard, how
    )

    start = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a group lost after retries is recorded below, not fatal
    try:  # DataContext settings are captured when the dataset is created
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    finally:
        ctx.max_errored_blocks = saved
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_task_retries; the default (-1) would retry a
        # group that kills its worker (a video crashing FFmpeg) forever.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.flat_map(
            GroupWorker,
            fn_constructor_kwargs={
                "out": _worker_out(cfg.out),
                "flow": cfg.flow,
                "short_side": cfg.resolved_short_side(),
                "max_frames": cfg.max_frames,
                "jpeg_quality": cfg.jpeg_quality,
                "max_long_side": cfg.max_long_side,
            },
            compute=pool,
            num_cpus=1,
            **({"num_gpus": cfg.gpus_per_worker} if cfg.gpus_per_worker > 0 else {}),
            max_task_retries=MAX_TASK_RETRIES,
        )
    frames, busy, cpu, seen = 0, 0.0, 0.0, set()
    for result in ds.iter_rows():
        seen.add(result[S.VIDEO_ID])
        frames += int(result["num_frames"])
        busy += float(result["seconds"])
        cpu += float(result["cpu_seconds"])
    lost = [it for it in todo if it.video_id not in seen]
    if lost:
        logger.error("%d videos got no result (their group failed after retries)", len(lost))
        rows = [_failed_row(it.video_id, LOST_REASON, S.STATUS_RETRY) for it in lost]
        try:
            _write_manifest(fs, root, group_name([it.video_id for it in lost], "lost"), rows)
        except OSError as e:  # without rows they are still not done: a rerun processes them
            logger.error("could not record them in the manifest: %s", first_line(e))
    return {
        "frames": frames,
        "pipeline_seconds": time.perf_counter() - start,
        "worker_seconds": busy,
        "worker_cpu_seconds": cpu,
    }


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():  # RAY_ADDRESS or a `ray start` cluster, else a local instance
        ray.init()


def _worker_out(out: str) -> str:
    """``--out`` as Ray workers resolve it (they run in other directories)."""
    return out if "://" in out else os.path.abspath(out)


# --- --verify ----------------------------------------------------------------------------------
def verify_shard(out: str, path: str) -> tuple[int, list[tuple[str, str]], str]:
    """Check every row of shard file ``path`` of ``out`` (``shards.row_problem``), one row group
    (one video) at a time: (rows checked, [(video_id, problem)], "" or why the file cannot be
    read at all). A row group that cannot be read is a problem of its videos. A Ray task."""
    fs, _ = storage.resolve(out)
    try:
        shard = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        return 0, [], _one_line(e)
    with contextlib.closing(shard):
        try:
            groups = [
                shard.read_row_group(i, columns=[S.VIDEO_ID])[S.VIDEO_ID].to_pylist()
                for i in range(shard.num_row_groups)
            ]
        except (OSError, pa.ArrowException) as e:
            return 0, [], _one_line(e)
        checked, bad = 0, []
        for i, ids in enumerate(groups):
            checked += len(ids)
            try:
                rows = shard.read_row_group(i).to_pylist()
            except (OSError, pa.ArrowException) as e:
                bad += [(v, f"its row group cannot be read: {_one_line(e)}") for v in ids]
                continue
            for row in rows:
                problem = S.row_problem(row)
                if problem:
                    bad.append((row[S.VIDEO_ID], problem))
            del rows
    return checked, bad, ""


def _verify(cfg: PreprocessConfig, fs: pafs.FileSystem, root: str) -> tuple[int, set[str]]:
    """``--verify``: check every stored row (one Ray task per shard file); remove the videos
    that fail from their shards (rewritten atomically; deleted when none remain) and set
    unreadable shards aside, so that they are processed again. Returns (videos checked, the
    ids of those that failed)."""
    import ray

    files = S.list_parquet(fs, posixpath.join(root, S.SHARDS_DIR))
    if not files:
        return 0, set()
    _ensure_ray()
    task = ray.remote(num_cpus=1)(verify_shard)
    out = _worker_out(cfg.out)
    refs = [task.remote(out, path) for path in files]
    logger.info("verifying the videos of %d shard files", len(files))
    checked, failed = 0, set()
    for path, ref in zip(files, refs):
        name = posixpath.basename(path)
        try:
            n, bad, unreadable = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - its task died (after Ray's retries)
            logger.error("could not verify %s (its videos are kept): %s", name, first_line(e))
            continue
        if unreadable:
            _set_aside(fs, path, unreadable)  # its videos are processed again
            continue
        checked += n
        for video_id, problem in bad:
            logger.warning(
                "%s in %s failed verification: %s (removed, to be processed again)",
                video_id, name, problem,
            )  # fmt: skip
        drop = {v for v, _ in bad}
        if drop:
            _rewrite_without(fs, path, drop)
            failed |= drop
    logger.info("verified %d stored videos: %d failed", checked, len(failed))
    return checked, failed


def _rewrite_without(fs: pafs.FileSystem, path: str, drop: set[str]) -> None:
    """Rewrite shard ``path`` without the rows of ``drop`` (atomically, one row group at a time,
    never reading those rows); delete it when no row remains."""
    writer = S.ParquetStreamWriter(fs, path, via_temp=True)
    with contextlib.closing(pq.ParquetFile(path, filesystem=fs)) as shard, writer:
        writer.schema = shard.schema_arrow
        for i in range(shard.num_row_groups):
            ids = shard.read_row_group(i, columns=[S.VIDEO_ID])[S.VIDEO_ID].to_pylist()
            keep = [k for k, v in enumerate(ids) if v not in drop]
            if keep:
                table = shard.read_row_group(i)
                writer.write(table if len(keep) == len(ids) else table.take(keep))
    if not writer.rows:
        fs.delete_file(path)


# --- resume: make OUT consistent and find what is done -----------------------------------------
def _repair(fs: pafs.FileSystem, root: str) -> dict[str, str]:
    """Clean OUT after an interruption; return video_id -> shard file name of the ok videos.

    Deletes temp leftovers, moves unreadable Parquet files to OUT/unreadable/, keeps each
    video in one shard file only and makes the manifest agree with the shards.
    """
    for sub in (S.SHARDS_DIR, S.MANIFEST_DIR):
        directory = posixpath.join(root, sub)
        if fs.get_file_info(directory).type == pafs.FileType.NotFound:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.base_name.startswith(storage.TMP_PREFIX):
                logger.info("deleting leftover %s", info.path)
                fs.delete_file(info.path)
    shard_of: dict[str, str] = {}
    for path in S.list_parquet(fs, posixpath.join(root, S.SHARDS_DIR)):
        name = posixpath.basename(path)
        ids = _read_ids(fs, path)
        if ids is None:
            continue
        dups = [v for v in ids if v in shard_of]
        if dups:
            logger.warning("%s repeats %d videos of other shards: removing them", name, len(dups))
            _rewrite_without(fs, path, set(dups))
            if set(dups) >= set(ids):  # the file is gone
                continue
        for v in ids:
            shard_of.setdefault(v, name)
    _rewrite_manifest(fs, root, shard_of, drop=set())
    return shard_of


def _read_ids(fs: pafs.FileSystem, path: str) -> list[str] | None:
    try:
        return pq.read_table(path, columns=[S.VIDEO_ID], filesystem=fs)[S.VIDEO_ID].to_pylist()
    except (OSError, pa.ArrowException) as e:
        _set_aside(fs, path, e)
        return None


def _set_aside(fs: pafs.FileSystem, path: str, error: BaseException | str) -> None:
    """Move an unreadable file to OUT/unreadable/ (its videos will be redone)."""
    head, name = posixpath.split(path)
    root, sub = posixpath.split(head)
    target = posixpath.join(root, S.UNREADABLE_DIR, f"{sub}-{name}")
    logger.warning("moving unreadable %s to %s: %s", path, target, error)
    fs.create_dir(posixpath.dirname(target), recursive=True)
    fs.move(path, target)


# which row of a video counts when parts disagree: ok, then a definite failure, then retry
_PRIORITY = {S.STATUS_OK: 0, S.STATUS_FAILED: 1, S.STATUS_RETRY: 2}


def _priority(status: str) -> int:
    return _PRIORITY.get(status, _PRIORITY[S.STATUS_FAILED])


def _rewrite_manifest(
    fs: pafs.FileSystem, root: str, shard_of: dict[str, str], drop: set[str]
) -> None:
    """Make the manifest agree with the shards: one row per video; ok rows name the shard that
    holds the video; ok rows whose video no shard holds are removed (it will be redone); failed
    and retry rows of videos in ``drop`` are removed (to be processed again). Of a video's
    other rows the first failed one is kept, else its first retry row. Adds rows for shard
    videos it lacks.
    """
    parts = []
    for path in S.list_parquet(fs, posixpath.join(root, S.MANIFEST_DIR)):
        try:
            parts.append((path, pq.read_table(path, filesystem=fs).to_pylist()))
        except (OSError, pa.ArrowException) as e:
            _set_aside(fs, path, e)
    best: dict[str, int] = {}  # video_id -> the priority of its best row that stays
    for _, rows in parts:
        for row in rows:
            vid, status = row[S.VIDEO_ID], row[S.STATUS]
            if vid not in shard_of and status != S.STATUS_OK and vid not in drop:
                best[vid] = min(best.get(vid, 99), _priority(status))
    seen: set[str] = set()
    for path, rows in parts:
        keep = []
        for row in rows:
            vid = row[S.VIDEO_ID]
            if vid in seen:
                continue
            if vid in shard_of:
                row = {S.VIDEO_ID: vid, S.STATUS: S.STATUS_OK, S.ERROR: "", S.SHARD: shard_of[vid]}
            elif vid not in best or _priority(row[S.STATUS]) != best[vid]:
                continue  # an ok row without a shard, a row to drop, or a worse row
            keep.append(row)
            seen.add(vid)
        if keep == rows:
            continue
        if keep:
            _write_manifest(fs, root, posixpath.basename(path), keep)
        else:
            fs.delete_file(path)
    lacking = sorted(v for v in shard_of if v not in seen)
    if lacking:
        logger.info("adding %d manifest rows for videos found in shards", len(lacking))
        rows = [
            {S.VIDEO_ID: v, S.STATUS: S.STATUS_OK, S.ERROR: "", S.SHARD: shard_of[v]}
            for v in lacking
        ]
        _write_manifest(fs, root, group_name(lacking, "recovered"), rows)


def _manifest_status(fs: pafs.FileSystem, root: str) -> dict[str, tuple[str, str]]:
    """video_id -> (status, error) from every manifest part: its ok row, else its first failed
    row, else its first retry row."""
    status: dict[str, tuple[str, str]] = {}
    for path in S.list_parquet(fs, posixpath.join(root, S.MANIFEST_DIR)):
        table = pq.read_table(path, columns=[S.VIDEO_ID, S.STATUS, S.ERROR], filesystem=fs)
        for v, st, err in zip(*(table[c].to_pylist() for c in (S.VIDEO_ID, S.STATUS, S.ERROR))):
            if v not in status or _priority(st) < _priority(status[v][0]):
                status[v] = (st, err)
    return status


def _summarise(
    fs: pafs.FileSystem,
    root: str,
    cfg: PreprocessConfig,
    listing: Listing,
    skipped: int,
    processed: int,
    start: float,
) -> PreprocessSummary:
    """The counts from the manifest. Failed: status failed or retry, or no row at all (its
    result could not be recorded: a plain rerun processes it, as a retry one)."""
    status = _manifest_status(fs, root)
    ok, retry, failures = 0, 0, []
    for v in (it.video_id for it in listing.items):
        st, err = status.get(v, (S.STATUS_RETRY, "no result recorded (see the log)"))
        if st == S.STATUS_OK:
            ok += 1
        elif st == S.STATUS_RETRY:
            retry += 1
            failures.append((v, f"{err} (status retry: a plain rerun processes it again)"))
        else:
            failures.append((v, err))
    return PreprocessSummary(
        total=len(listing.items),
        ok=ok,
        failed=len(failures),
        skipped=skipped,
        processed=processed,
        frames=0,
        seconds=time.perf_counter() - start,
        pipeline_seconds=0.0,
        out=cfg.out,
        shards=storage.join(cfg.out, S.SHARDS_DIR),
        manifest=storage.join(cfg.out, S.MANIFEST_DIR),
        failures=failures[:20],
        max_failures=cfg.max_failures,
        retry=retry,
    )
