"""The benchmarks' synthetic inputs, in one place, made with stm's own writers and planners.

- :func:`shard_table` / :func:`write_shards`: shard rows (``stm.data.shards.shard_rows``) of
  paper-size videos without any video file, written with ``write_table_atomic``: a smooth
  textured scene that drifts, and smooth noisy flow around 128, JPEG q90 (``encode_jpeg``):
  RGB ~25 kB and flow planes ~10 kB at 340x256, like TV-L1 shards of real footage.
- :func:`order_shards`: shards of tiny identical videos in a given order of videos (the data
  order benchmark).
- :func:`planned_batches`: those rows planned for ``--decode device``
  (``stm.data.device_clips.plan_train_batch``), what its Ray Data workers ship.
- :func:`photo_clips`: grayscale clips of a real photograph panning and rotating (flow input).
- :func:`synthetic_videos`: the job's synthetic dataset (``stm.data.synthetic``), as encoded
  videos and their decoded grayscale frames.

Only :func:`synthetic_videos` needs PyAV (imported there); the rest needs numpy, OpenCV and
pyarrow (and torch for the plans), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pyarrow as pa

from stm.data.shards import SHARDS_DIR, encode_jpeg, resolve, shard_rows, write_table_atomic


def _smooth(rng: np.random.Generator, h: int, w: int, c: int, cells: int, amp: float) -> np.ndarray:
    """A random smooth field (bicubic upsampling of a coarse random grid)."""
    coarse = rng.normal(0, amp, (cells, cells * w // h + 1, c)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)


def shard_table(videos: int, frames: int, width: int, height: int) -> pa.Table:
    """A shard table (``SHARD_SCHEMA``) of ``videos`` synthetic videos of ``frames`` frames at
    width x height, labels 0-2, training videos of splits 1-3; the same for every call."""
    rng = np.random.default_rng(0)
    h, w = height, width
    rows = []
    for v in range(videos):
        scene = (
            128 + _smooth(rng, h + 64, w + 64, 3, 12, 60) + rng.normal(0, 6, (h + 64, w + 64, 3))
        )
        scene = np.clip(scene, 0, 255).astype(np.uint8)
        rgb, fu, fv = [], [], []
        for i in range(frames):
            dy, dx = int(32 + 20 * np.sin(i / 9)), int(32 + 30 * np.cos(i / 13))
            rgb.append(encode_jpeg(np.ascontiguousarray(scene[dy : dy + h, dx : dx + w])))
            if i < frames - 1:
                for lst in (fu, fv):
                    f = 128 + _smooth(rng, h, w, 1, 6, 25)[..., 0] + rng.normal(0, 2, (h, w))
                    lst.append(encode_jpeg(np.clip(f, 0, 255).astype(np.uint8)))
        rows.append(
            {
                "video_id": f"syn/v{v:03d}",
                "label": v % 3,
                "class_name": f"c{v % 3}",
                "num_frames": frames,
                "fps": 25.0,
                "height": h,
                "width": w,
                "rgb": rgb,
                "flow_u": fu,
                "flow_v": fv,
                "train_splits": [1, 2, 3],
                "test_splits": [],
            }
        )
    return shard_rows(rows)


def write_shards(out: str, table: pa.Table) -> str:
    """Write ``table`` as the one shard file of a dataset folder ``out``; return ``out``."""
    fs, root = resolve(out)
    write_table_atomic(fs, f"{root}/{SHARDS_DIR}/part-bench.parquet", table)
    return out


def planned_batches(
    table: pa.Table, epochs, *, batch_size: int, num_chunks: int, flow_length: int, crop_size: int
) -> list[pa.Table]:
    """``--decode device``'s planned micro-batches of ``batch_size`` videos of ``table`` for
    each epoch number of ``epochs`` (seed 0), epoch by epoch."""
    from stm.data.clips import TrainClipSpec
    from stm.data.device_clips import plan_train_batch

    spec = TrainClipSpec(num_chunks=num_chunks, flow_length=flow_length, crop_size=crop_size)
    return [
        plan_train_batch(table.slice(i, batch_size), spec, epoch=epoch, seed=0)
        for epoch in epochs
        for i in range(0, table.num_rows, batch_size)
    ]


def photo_clips(n: int, frames: int, width: int, height: int) -> list[np.ndarray]:
    """``n`` grayscale clips of a real photograph (matplotlib's sample grace_hopper.jpg) panning
    and rotating by sub-pixel steps, ``frames`` frames of width x height each."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(img, (width + 80, height + 80), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        (dx, dy), ang = rng.uniform(-2.5, 2.5, size=2), rng.uniform(-1.0, 1.0)
        clip = []
        for t in range(frames):
            m = cv2.getRotationMatrix2D(((width + 80) / 2, (height + 80) / 2), ang * t, 1.0)
            m[:, 2] += (dx * t, dy * t)
            moved = cv2.warpAffine(big, m, big.shape[::-1], flags=cv2.INTER_CUBIC)
            clip.append(moved[40 : 40 + height, 40 : 40 + width])
        out.append(np.ascontiguousarray(np.stack(clip)))
    return out


def synthetic_videos(folder: str, n: int, frames: int, width: int, height: int):
    """(root, videos, grayscale frames per video): ``stm.data.synthetic.generate_synthetic``'s
    dataset under ``folder`` (``list_videos("synthetic", root).items``), decoded as the
    preprocessing job decodes it (PyAV)."""
    from stm.data.decode import decode_video
    from stm.data.sources import list_videos
    from stm.data.synthetic import generate_synthetic

    root = generate_synthetic(folder, n, seed=0, width=width, height=height, num_frames=frames)
    items = list_videos("synthetic", root).items
    gray = [
        np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in decode_video(it.path).frames])
        for it in items
    ]
    return root, items, gray


def order_shards(out: str, items: list, per_shard: int) -> None:
    """Shards of tiny identical videos (16 frames of 32x24) in the order of ``items``
    (``stm.data.sources.VideoItem``s), ``per_shard`` videos each: what an order is measured on."""
    rng = np.random.default_rng(0)
    frame = encode_jpeg(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    plane = encode_jpeg(np.full((24, 32), 128, dtype=np.uint8))
    fs, root = resolve(out)
    for s in range(0, len(items), per_shard):
        rows = [
            {
                "video_id": it.video_id,
                "label": it.label,
                "class_name": it.class_name,
                "num_frames": 16,
                "fps": 25.0,
                "height": 24,
                "width": 32,
                "rgb": [frame] * 16,
                "flow_u": [plane] * 15,
                "flow_v": [plane] * 15,
                "train_splits": [1],
                "test_splits": [],
            }
            for it in items[s : s + per_shard]
        ]
        write_table_atomic(fs, f"{root}/{SHARDS_DIR}/part-{s:06d}.parquet", shard_rows(rows))
