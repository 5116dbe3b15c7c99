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

Batched estimators (``tvl1-torch``: TV-L1 in PyTorch, on CUDA when present) run their bare loop
in this process, all pairs of a video in one ``compute`` call. ``--no-ray`` runs the bare loops
only, on frames of a moving real photograph (``bench_data.photo_clips``; no Ray, no PyAV, no
video files: it runs on a machine with plain PyTorch and OpenCV):

    python benchmarks/flow_throughput.py --no-ray --algorithms tvl1-torch tvl1 \
        --width 340 --height 256 --videos 2 --frames 9 --workers 1

For tvl1-torch, ``--compile on|off`` (default auto: on CUDA only) and ``--sync-every K``;
``--no-ray`` also prints the work it did: inner iterations run per warp (per pyramid level
too), which with the kernels an iteration launches decides its speed on a GPU.
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
from bench_data import photo_clips, synthetic_videos

from stm.data.flow import FLOW_ESTIMATORS, make_estimator

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


def batched_loop(name: str, videos: list[np.ndarray], device: str | None, options=None):
    """(pairs, wall seconds, CPU seconds, estimator, warm-up seconds) of a batched estimator in
    this process, one ``compute`` call per video (warm-up excluded: CUDA start, kernels, and
    with torch.compile the compilation, which its dynamic shapes make once for all sizes).
    ``options``: more constructor arguments (tvl1-torch: compile, sync_every)."""
    kwargs = {**({"device": device} if device else {}), **(options or {})}
    est = make_estimator(name, **kwargs)
    warm = time.perf_counter()
    est.compute(videos[0][:1, :48, :64], videos[0][1:2, :48, :64])  # warm up: CUDA, kernels
    _sync(est)
    warm = time.perf_counter() - warm
    if hasattr(est, "reset_stats"):
        est.reset_stats()
    cpu, start = time.process_time(), time.perf_counter()
    for v in videos:
        est.compute(v[:-1], v[1:])
    _sync(est)
    wall = time.perf_counter() - start
    return sum(len(v) - 1 for v in videos), wall, time.process_time() - cpu, est, warm


def _sync(est) -> None:
    if str(getattr(est, "device", "cpu")).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def torch_options(a) -> dict:
    """tvl1-torch's constructor arguments from ``--compile`` and ``--sync-every``."""
    opts = {} if a.compile == "auto" else {"compile": a.compile == "on"}
    return opts | ({"sync_every": a.sync_every} if a.sync_every else {})


def is_batched(name: str) -> bool:
    return getattr(FLOW_ESTIMATORS[name], "batched", False) or name == "tvl1-torch"


def bare_run(name: str, videos: list[np.ndarray], workers: int, device: str | None, options=None):
    if is_batched(name):
        return batched_loop(name, videos, device, options if name == "tvl1-torch" else None)[:3]
    return bare_loop(name, videos, workers)


def work_line(est, warm: float) -> str:
    """tvl1-torch's work: inner iterations run per warp (a batch's, i.e. a GPU's work), overall
    and per pyramid level (0: full size), host syncs and outer iterations per warp."""
    s = est.stats
    levels = sorted(s["level_warps"])
    top = est.outer_iterations * est.inner_iterations
    per = ", ".join(f"{s['level_inner_iterations'][k] / s['level_warps'][k]:.1f}" for k in levels)
    return (
        f"  {est.name}: compile {'on' if est.compile else 'off'}"
        f"{' (' + est.compile_mode + ')' if est.compile_mode else ''}, sync_every "
        f"{est.sync_every}, device {est.device}; warm-up (with any compilation) {warm:.1f} s; "
        f"inner iterations per warp {s['inner_iterations'] / s['warps']:.1f} "
        f"(levels {levels[0]}..{levels[-1]}: {per}; max {top})"
        f"; outer per warp {s['outer_iterations'] / s['warps']:.2f}; syncs per warp "
        f"{s['syncs'] / s['warps']:.1f}; {s['warps'] // max(s['batches'], 1)} warps a batch"
    )


def main_no_ray(a) -> None:
    gray = photo_clips(a.videos, a.frames, a.width, a.height)
    pairs = sum(len(g) - 1 for g in gray)
    print(
        f"{a.videos} clips x {a.frames} frames of {a.width}x{a.height} = {pairs} frame pairs, "
        f"{a.workers} processes (batched estimators: this process, device {a.device or 'auto'}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("flow       | bare pairs/s | CPU ms/pair (this process or the pool) | load avg")
    for name in a.algorithms:
        batched = is_batched(name)
        if batched:
            opts = torch_options(a) if name == "tvl1-torch" else None
            n, wall, cpu, est, warm = batched_loop(name, gray, a.device, opts)
        else:
            n, wall, cpu = bare_loop(name, gray, a.workers)
        print(
            f"{name:10s} | {n / wall:12.2f} | {1000 * cpu / n:13.1f} | {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if batched and hasattr(est, "stats"):
            print(work_line(est, warm), flush=True)


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
    p.add_argument("--no-ray", action="store_true", help="bare loops only, no Ray and no PyAV")
    p.add_argument("--device", help="batched estimators' device (default: cuda when present)")
    p.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto",
        help="tvl1-torch: torch.compile the inner step (auto: on CUDA only)",
    )  # fmt: skip
    p.add_argument(
        "--sync-every", type=int, default=0,
        help="tvl1-torch: inner iterations between convergence checks (0: its default)",
    )  # fmt: skip
    a = p.parse_args()
    if a.smoke_test:
        a.videos, a.frames, a.width, a.height = 4, 6, 48, 32
    if a.no_ray:
        main_no_ray(a)
        return

    import ray

    from stm.config import PreprocessConfig
    from stm.data.preprocess import run_preprocess

    work = a.dir or tempfile.mkdtemp(prefix="stm-flow-bench-")
    root, items, gray = synthetic_videos(
        os.path.join(work, "videos"), a.videos, a.frames, a.width, a.height
    )
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
        n, before_s, before_cpu = bare_run(name, gray, a.workers, a.device, torch_options(a))
        cfg = PreprocessConfig(
            source="ucf101", root=root, splits=root, out=os.path.join(work, f"out-{name}"),
            flow=name, short_side=min(a.width, a.height), workers=a.workers,
            videos_per_shard=a.videos_per_shard, max_failures=0.0,
        )  # fmt: skip
        summary = run_preprocess(cfg)
        if summary.processed != len(items):
            print(f"{name}: {cfg.out} already held results; use a fresh --dir")
            continue
        n, after_s, after_cpu = bare_run(name, gray, a.workers, a.device, torch_options(a))
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
