"""Flow throughput: the Ray Data preprocessing pipeline against a bare loop over the same kernel.

For each algorithm, on the same synthetic videos and with the same number of processes:

- bare:     a process pool; each process calls the OpenCV flow on every consecutive pair of
            already decoded grayscale frames (flow only, nothing else); measured before and after
            the pipeline and averaged, as other load on the machine drifts;
- pipeline: ``run_preprocess`` on those videos: decode, flow, quantise, JPEG, Parquet writes,
            with Ray Data's actor start-up included.

It prints frame pairs per second for both and the pipeline's overhead over the bare kernel, in
wall time (start-up included) and in CPU time per pair (the actors' whole process against the
bare processes; steadier than wall time on a shared machine). It asserts nothing about time.

    python benchmarks/flow_throughput.py                       # tvl1, dis, farneback
    python benchmarks/flow_throughput.py --algorithms dis --videos 8 --smoke-test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time

import cv2
import numpy as np

from stm.data.decode import decode_video
from stm.data.flow import FLOW_ESTIMATORS, make_estimator
from stm.data.preprocess import PreprocessConfig, run_preprocess
from stm.data.sources import generate_synthetic, list_videos

_estimator = None


def _init_worker(name: str) -> None:
    global _estimator
    cv2.setNumThreads(1)
    _estimator = make_estimator(name)


def _flow_video(gray: np.ndarray) -> tuple[int, float]:
    cpu = time.process_time()
    for k in range(len(gray) - 1):
        _estimator(gray[k], gray[k + 1])
    return len(gray) - 1, time.process_time() - cpu


def bare_loop(name: str, videos: list[np.ndarray], workers: int) -> tuple[int, float, float]:
    """(pairs, wall seconds, CPU seconds) of the flow kernel alone in ``workers`` processes
    (pool start-up excluded)."""
    with mp.get_context("spawn").Pool(workers, _init_worker, (name,)) as pool:
        pool.map(_flow_video, [videos[0][:2]] * workers)  # warm up: imports, estimator creation
        start = time.perf_counter()
        done = pool.map(_flow_video, videos, chunksize=1)
        wall = time.perf_counter() - start
    return sum(n for n, _ in done), wall, sum(c for _, c in done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=sorted(FLOW_ESTIMATORS, reverse=True))
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--videos-per-shard", type=int, default=2)
    p.add_argument("--dir", help="work folder (default: a temp folder)")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, to check it runs")
    a = p.parse_args()
    if a.smoke_test:
        a.videos, a.frames, a.width, a.height = 4, 6, 48, 32

    import ray

    work = a.dir or tempfile.mkdtemp(prefix="stm-flow-bench-")
    root = generate_synthetic(
        os.path.join(work, "videos"), a.videos, seed=0, width=a.width, height=a.height,
        num_frames=a.frames,
    )  # fmt: skip
    items = list_videos("synthetic", root).items
    gray = [
        np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in decode_video(it.path).frames])
        for it in items
    ]
    pairs = sum(len(g) - 1 for g in gray)
    print(
        f"{len(items)} videos x {a.frames} frames of {a.width}x{a.height} = {pairs} frame pairs, "
        f"{a.workers} processes; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}"
    )
    ray.init(num_cpus=a.workers, include_dashboard=False)
    print(
        "flow       | bare pairs/s (before, after) | pipeline pairs/s | overhead (wall) |"
        " CPU ms/pair bare, pipeline | overhead (CPU) | load avg"
    )
    for name in a.algorithms:
        n, before_s, before_cpu = bare_loop(name, gray, a.workers)
        cfg = PreprocessConfig(
            source="ucf101", root=root, splits=root, out=os.path.join(work, f"out-{name}"),
            flow=name, short_side=min(a.width, a.height), num_workers=a.workers,
            videos_per_shard=a.videos_per_shard, max_failures=0.0,
        )  # fmt: skip
        summary = run_preprocess(cfg)
        if summary.processed != len(items):
            print(f"{name}: {cfg.out} already held results; use a fresh --dir")
            continue
        n, after_s, after_cpu = bare_loop(name, gray, a.workers)
        bare = 2 * n / (before_s + after_s)
        pipe = pairs / summary.pipeline_seconds
        bare_cpu = 1000 * (before_cpu + after_cpu) / (2 * n)
        pipe_cpu = 1000 * summary.worker_cpu_seconds / pairs
        print(
            f"{name:10s} | {bare:8.2f} ({n / before_s:.2f}, {n / after_s:.2f})"
            f" | {pipe:16.2f} | {100 * (bare / pipe - 1):14.1f}%"
            f" | {bare_cpu:12.1f}, {pipe_cpu:13.1f} | {100 * (pipe_cpu / bare_cpu - 1):13.1f}%"
            f" | {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
