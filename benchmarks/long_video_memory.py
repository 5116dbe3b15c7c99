"""Peak memory of preprocessing one video against its length (no Ray).

For synthetic videos of increasing length (a textured scene panning under a moving disc, encoded
with PyAV as MPEG-4 part 2 in AVI, like the synthetic dataset), each measurement runs in a fresh
Python process, after a warm-up on the video's first frames: the peak RSS increase (``VmHWM``
reset through ``/proc/self/clear_refs``, minus the RSS before the call) of

- ``stream``:     ``process_video`` with DIS: decode, resize, flow pair by pair, JPEG as it goes;
- ``actor``:      ``process_group`` with DIS on a one-video group, writing its shard and manifest
                  to a local folder: what a flow actor holds (the row, the Arrow table built from
                  it, the Parquet file's buffer and its bytes);
- ``batched``:    ``process_video`` with DIS behind the batched interface (``batched = True``,
                  ``batch_size`` 64, ``compute``), i.e. the host side of tvl1-torch now;
- ``batched-all``: the same estimator given all pairs of the video in one ``compute`` call, as
                  ``process_video`` did for tvl1-torch before (all grayscale frames, then the
                  float flow of all pairs), then the JPEGs.

It prints one line per (video, path): frames, seconds, the JPEG bytes of the row (and the
Parquet file's size for ``actor``), the peak RSS increase and its ratio to the JPEG bytes.

    python benchmarks/long_video_memory.py                    # 10, 30, 120 s at 25 fps, 320x240
    python benchmarks/long_video_memory.py --seconds 2 4 --width 160 --height 120 --smoke-test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

PATHS = ("stream", "actor", "batched", "batched-all")
FPS = 25


def write_video(path: str, num_frames: int, width: int, height: int) -> None:
    """A smooth random texture panning (sinusoidally, up to ~8 px a frame) under a textured disc
    moving on its own path; frames are rendered and encoded one at a time."""
    import av
    import cv2

    rng = np.random.default_rng(0)
    pad = 200
    noise = rng.integers(0, 256, size=(height + pad, width + 2 * pad, 3)).astype(np.float32)
    big = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)
    big = big.astype(np.uint8)
    disc = cv2.normalize(
        cv2.GaussianBlur(rng.normal(size=(height, width, 3)).astype(np.float32), (0, 0), 2),
        None, 0, 255, cv2.NORM_MINMAX,
    ).astype(np.uint8)  # fmt: skip
    ys, xs = np.mgrid[:height, :width]
    radius = min(width, height) / 5
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        stream.codec_context.thread_count = 1
        for t in range(num_frames):
            x = int(pad + 0.75 * pad * np.sin(t / 15))
            y = int(pad / 2 + 0.4 * pad * np.cos(t / 23))
            frame = np.ascontiguousarray(big[y : y + height, x : x + width])
            cx = width / 2 + width / 3 * np.sin(t / 9)
            cy = height / 2 + height / 3 * np.cos(t / 13)
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
            frame[inside] = disc[inside]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class BatchedDIS:
    """DIS behind the batched interface of tvl1-torch (host memory of its path, DIS's speed)."""

    batched = True
    batch_size = 64

    def __init__(self) -> None:
        from stm.data.flow import DISFlow

        self._dis = DISFlow()

    def compute(self, prevs: np.ndarray, nexts: np.ndarray) -> np.ndarray:
        out = np.empty((len(prevs), *prevs.shape[1:], 2), dtype=np.float32)
        for k, (p, n) in enumerate(zip(prevs, nexts)):
            out[k] = self._dis(p, n)
        return out


def all_pairs_at_once(item: dict, estimator, jpeg_quality: int) -> dict:
    """``process_video`` as it was for a batched estimator: every grayscale frame kept, then
    one ``compute`` call for all pairs (the float flow of the whole video), then the JPEGs."""
    import cv2

    from stm.data import shards as S
    from stm.data.decode import VideoReader
    from stm.data.flow import quantize_flow

    rgb, grays, flow_u, flow_v = [], [], [], []
    with VideoReader(item["path"]) as video:
        for frame in video.frames(None):
            rgb.append(S.encode_jpeg(frame, jpeg_quality))
            grays.append(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
    stack = np.stack(grays)
    for flow in estimator.compute(stack[:-1], stack[1:]):
        u, v = quantize_flow(flow)
        flow_u.append(S.encode_jpeg(u, jpeg_quality))
        flow_v.append(S.encode_jpeg(v, jpeg_quality))
    return {S.RGB: rgb, S.FLOW_U: flow_u, S.FLOW_V: flow_v, S.NUM_FRAMES: len(rgb)}


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(path: str, mode: str) -> dict:
    """In this (fresh) process: warm up, then one call of ``mode`` on the video ``path``."""
    import cv2
    import pyarrow.fs as pafs

    from stm.config import JPEG_QUALITY
    from stm.data import shards as S
    from stm.data.flow import DISFlow
    from stm.data.preprocess import process_group, process_video

    cv2.setNumThreads(1)
    item = {
        "video_id": "v",
        "path": path,
        "missing": "",
        "label": 0,
        "class_name": "c",
        "train_splits": [1],
        "test_splits": [],
    }
    est = BatchedDIS() if mode.startswith("batched") else DISFlow()
    fs = pafs.LocalFileSystem()
    out = tempfile.mkdtemp(prefix="stm-longvideo-")
    process_video(item, est, None, max_frames=4)  # warm-up: codecs, DIS, JPEG, Parquet, zstd
    process_group(fs, out, "warm-up.parquet", [item], DISFlow(), None, 2, JPEG_QUALITY)
    gc.collect()
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False  # then VmHWM is the process's peak so far (warm-up included)
    start = time.perf_counter()
    parquet = 0
    if mode in ("stream", "batched"):
        row = process_video(item, est, None)
    elif mode == "batched-all":
        row = all_pairs_at_once(item, est, JPEG_QUALITY)
    elif mode == "actor":
        results = process_group(fs, out, "part-0.parquet", [item], est, None, None, JPEG_QUALITY)
        assert results[0][S.STATUS] == S.STATUS_OK, results
        shard = os.path.join(out, S.SHARDS_DIR, "part-0.parquet")
        parquet = os.path.getsize(shard)
        row = None
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    if row is None:
        import pyarrow.parquet as pq

        table = pq.read_table(shard)
        frames = int(table[S.NUM_FRAMES][0].as_py())
        jpeg = sum(table[c].combine_chunks().values.nbytes for c in S.JPEG_COLUMNS)
        del table
    else:
        frames = int(row[S.NUM_FRAMES])
        jpeg = sum(len(b) for c in S.JPEG_COLUMNS for b in row[c])
    assert "ray" not in sys.modules, "the benchmark must not import Ray"
    return {
        "mode": mode,
        "frames": frames,
        "seconds": seconds,
        "jpeg_bytes": jpeg,
        "parquet_bytes": parquet,
        "peak_increase": peak - base,
        "peak_reset": reset,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 30, 120])
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--dir", default="", help="where to write the videos (default: a temp dir)")
    p.add_argument("--smoke-test", action="store_true", help="check the figures' consistency")
    p.add_argument("--one", nargs=2, metavar=("VIDEO", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return

    folder = args.dir or tempfile.mkdtemp(prefix="stm-longvideo-videos-")
    os.makedirs(folder, exist_ok=True)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, {_mem_gib():.0f} GiB, python "
        f"{platform.python_version()}; {args.width}x{args.height} at {FPS} fps, DIS flow, "
        "native size, JPEG 95; one fresh process per line"
    )
    header = (
        f"{'video':>8} {'path':>12} {'frames':>7} {'seconds':>8} {'JPEG MiB':>9} "
        f"{'Parquet MiB':>11} {'peak +RSS MiB':>13} {'peak/JPEG':>9}"
    )
    print(header)
    results = []
    for secs in args.seconds:
        n = int(round(secs * FPS))
        video = os.path.join(folder, f"long-{n}-{args.width}x{args.height}.avi")
        if not os.path.exists(video):
            write_video(video, n, args.width, args.height)
        for mode in args.paths:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", video, mode],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{mode} on {video} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["video_seconds"] = secs
            results.append(r)
            mib = 2**20
            parquet = f"{r['parquet_bytes'] / mib:11.1f}" if r["parquet_bytes"] else f"{'-':>11}"
            print(
                f"{secs:>7g}s {mode:>12} {r['frames']:>7} {r['seconds']:>8.1f} "
                f"{r['jpeg_bytes'] / mib:>9.1f} {parquet} {r['peak_increase'] / mib:>13.1f} "
                f"{r['peak_increase'] / r['jpeg_bytes']:>9.2f}"
                + ("" if r["peak_reset"] else "  (peak not reset: includes the warm-up)"),
                flush=True,
            )
    if args.smoke_test:
        for r in results:
            assert r["frames"] == int(round(r["video_seconds"] * FPS)), r
            assert r["peak_increase"] > 0 and r["jpeg_bytes"] > 0, r
        print("smoke test passed")


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


if __name__ == "__main__":
    main()
