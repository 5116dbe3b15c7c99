"""Training-ingest throughput: chunks/s per CPU core delivered by the clip pipeline, with the
breakdown (Parquet read, JPEG decode, crop/resize/flip, collation) and the alternatives that
remove the decode bottleneck, side by side.

One *chunk* is an RGB frame and its 2L-channel flow stack (1 + 2L = 21 JPEGs at L=10, fewer
when the stacks of a clip overlap). Modes (all in this one run, on the same shards):

  stages     one process, each stage timed separately on the real sampling recipe
             (stm.data.clips: sample_chunk_times, flow_stack_indices, jitter crop, flip)
  sampler    one process, stm.data.clips.train_batch end to end (what a Ray Data task runs)
  reduced    "cheaper sampling": flow JPEGs decoded at half size by libjpeg's DCT scaling
             (cv2.IMREAD_REDUCED_GRAYSCALE_2), the crop box halved, then resized to S as before
  rawflow    flow stored as raw uint8 planes in zstd-compressed Parquet instead of JPEG (built
             here from the JPEG shards; stm's shard format is unchanged): bytes on disk and the
             read + crop cost; the RGB frame stays JPEG
  gpu        --decode device (stm.data.device_clips): clips planned on the CPU (JPEG bytes
             shipped), then decoded in one batched torchvision.io.decode_jpeg call per
             micro-batch and cropped / resized / flipped on CUDA (skipped without CUDA;
             --gpu-device cpu runs the same code on the CPU)
  ray        the real Ray Data ingest (stm.train.ingest: read_parquet -> map_batches(_clips)
             with TrainClipSampler -> iter_torch_batches), chunks/s per CPU core

    python benchmarks/ingest_throughput.py --smoke-test
    python benchmarks/ingest_throughput.py                         # paper-size frames 340x256
    python benchmarks/ingest_throughput.py --data /tmp/bench-syn   # a preprocessed dataset
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.data.clips import (  # noqa: E402
    _crop_resize,
    flow_stack_indices,
    jitter_crop_box,
    sample_chunk_times,
    train_batch,
)
from stm.data.shards import (  # noqa: E402
    FLOW_U,
    FLOW_V,
    HEIGHT,
    LABEL,
    NUM_FRAMES,
    RGB,
    SHARDS_DIR,
    VIDEO_ID,
    WIDTH,
    encode_jpeg,
    list_parquet,
    resolve,
    shard_rows,
    write_table_atomic,
)

CLIP_COLUMNS = [VIDEO_ID, LABEL, NUM_FRAMES, HEIGHT, WIDTH, RGB, FLOW_U, FLOW_V]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="a preprocessed dataset (default: generate paper-size shards)")
    p.add_argument("--frame-size", default="340x256", help="WxH of generated frames")
    p.add_argument("--videos", type=int, default=6, help="generated videos")
    p.add_argument("--frames", type=int, default=120, help="frames per generated video")
    p.add_argument("--chunks", type=int, default=5, help="T chunks per clip")
    p.add_argument("--flow-length", type=int, default=10)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="passes over the videos per mode")
    p.add_argument("--bn-batch", type=int, default=4, help="videos per Ray Data batch")
    p.add_argument(
        "--modes",
        default="stages,sampler,reduced,rawflow,gpu,ray",
        help="comma-separated subset of stages,sampler,reduced,rawflow,gpu,ray",
    )
    p.add_argument(
        "--gpu-device",
        default="cuda",
        help="device of the batched decode_jpeg mode (cpu: check the code path here)",
    )
    p.add_argument("--zstd-level", type=int, default=3)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, no Ray")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.frame_size, args.videos, args.frames, args.epochs = "96x72", 2, 24, 1
        args.crop_size = 64
        args.modes = args.modes.replace(",ray", "")
    args.modes = set(args.modes.split(","))
    return args


# --- data ---------------------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, h: int, w: int, c: int, cells: int, amp: float) -> np.ndarray:
    """A random smooth field (bicubic upsampling of a coarse random grid)."""
    coarse = rng.normal(0, amp, (cells, cells * w // h + 1, c)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)


def generate_shards(out: str, videos: int, frames: int, w: int, h: int) -> None:
    """Shards of synthetic videos at w x h: a smooth textured scene that drifts, and smooth
    noisy flow around 128, encoded with stm.data.shards.encode_jpeg (quality 90)."""
    rng = np.random.default_rng(0)
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
                VIDEO_ID: f"syn/v{v:03d}",
                LABEL: v % 3,
                "class_name": f"c{v % 3}",
                NUM_FRAMES: frames,
                "fps": 25.0,
                "height": h,
                "width": w,
                RGB: rgb,
                FLOW_U: fu,
                FLOW_V: fv,
                "train_splits": [1, 2, 3],
                "test_splits": [],
            }
        )
    fs, root = resolve(out)
    write_table_atomic(fs, f"{root}/{SHARDS_DIR}/part-bench.parquet", shard_rows(rows))


def shard_files(data: str) -> list[str]:
    fs, root = resolve(data)
    return list_parquet(fs, f"{root.rstrip('/')}/{SHARDS_DIR}")


def read_rows(files: list[str]) -> tuple[list[dict], float]:
    start = time.perf_counter()
    table = pa.concat_tables([pq.read_table(f, columns=CLIP_COLUMNS) for f in files])
    rows = table.to_pylist()
    return rows, time.perf_counter() - start


# --- one clip, stage by stage -------------------------------------------------------------------


def clip_plan(row: dict, args, rng: np.random.Generator):
    """(chunk times, flow indices per chunk, crop box, flip) as stm.data.clips.train_clip."""
    n = int(row[NUM_FRAMES])
    times = sample_chunk_times(n, args.chunks, (5, 35), rng=rng)
    idx = [flow_stack_indices(int(t), n - 1, args.flow_length) for t in times]
    return times, idx


def staged_epoch(rows, args, rng, flow_reduce: int = 1, raw=None) -> dict[str, float]:
    """Seconds per stage for one clip per video (decode, augment, collate), JPEG count."""
    t_dec = t_aug = t_col = 0.0
    jpegs = 0
    s = args.crop_size
    clips = []
    for vi, row in enumerate(rows):
        times, idx = clip_plan(row, args, rng)
        t0 = time.perf_counter()
        rgb_imgs = {}
        for t in times:
            if int(t) not in rgb_imgs:
                img = cv2.imdecode(np.frombuffer(row[RGB][int(t)], np.uint8), cv2.IMREAD_COLOR)
                rgb_imgs[int(t)] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        flows = {}
        need = sorted({int(k) for i in idx for k in i})
        for col in (FLOW_U, FLOW_V):
            for k in need:
                if raw is not None:
                    flows[col, k] = raw[vi][col][k]  # (H, W) views, no decode
                else:
                    flag = (
                        cv2.IMREAD_GRAYSCALE if flow_reduce == 1 else cv2.IMREAD_REDUCED_GRAYSCALE_2
                    )
                    flows[col, k] = cv2.imdecode(np.frombuffer(row[col][k], np.uint8), flag)
        jpegs += len(rgb_imgs) + (0 if raw is not None else 2 * len(need))
        t1 = time.perf_counter()
        h, w = next(iter(rgb_imgs.values())).shape[:2]
        box = jitter_crop_box(h, w, s, rng=rng)
        fbox = type(box)(*(c // flow_reduce for c in box))
        flip = bool(rng.random() < 0.5)
        rgb = np.empty((args.chunks, 3, s, s), np.uint8)
        flow = np.empty((args.chunks, 2 * args.flow_length, s, s), np.uint8)
        for i, t in enumerate(times):
            rgb[i] = _crop_resize(rgb_imgs[int(t)], box, s, s, flip).transpose(2, 0, 1)
            for j, k in enumerate(idx[i]):
                u = _crop_resize(flows[FLOW_U, int(k)], fbox, s, s, flip)
                flow[i, 2 * j] = 255 - u if flip else u
                flow[i, 2 * j + 1] = _crop_resize(flows[FLOW_V, int(k)], fbox, s, s, flip)
        t2 = time.perf_counter()
        clips.append((rgb, flow))
        if len(clips) == args.bn_batch or vi == len(rows) - 1:
            np.stack([c[0] for c in clips])
            np.stack([c[1] for c in clips])
            clips = []
        t3 = time.perf_counter()
        t_dec, t_aug, t_col = t_dec + t1 - t0, t_aug + t2 - t1, t_col + t3 - t2
    return {"decode": t_dec, "augment": t_aug, "collate": t_col, "jpegs": jpegs}


def run_staged(rows, read_s, args, label, **kw) -> float:
    """Print the per-chunk breakdown of ``args.epochs`` epochs; return chunks/s on one core."""
    rng = np.random.default_rng(1)
    tot = {"decode": 0.0, "augment": 0.0, "collate": 0.0, "jpegs": 0}
    for _ in range(args.epochs):
        for k, v in staged_epoch(rows, args, rng, **kw).items():
            tot[k] += v
    chunks = args.epochs * len(rows) * args.chunks
    # A real epoch reads each video row once: the read is charged once per epoch.
    read = read_s * args.epochs
    total = read + tot["decode"] + tot["augment"] + tot["collate"]
    ms = {k: 1e3 * v / chunks for k, v in (("read", read), *tot.items()) if k != "jpegs"}
    rate = chunks / total
    print(
        f"{label}: {rate:.1f} chunks/s on one core ({1e3 / rate:.2f} ms/chunk): "
        f"read (Parquet + to_pylist) "
        f"{ms['read']:.2f} ms, decode {ms['decode']:.2f} ms "
        f"({tot['jpegs'] / chunks:.1f} JPEGs/chunk), "
        f"crop/resize/flip {ms['augment']:.2f} ms, collate {ms['collate']:.2f} ms"
    )
    return rate


# --- alternatives -------------------------------------------------------------------------------


def raw_flow_table(rows: list[dict], path: str, level: int) -> tuple[list[dict], int, float]:
    """Write the flow of ``rows`` as raw uint8 planes (list<binary>, H*W bytes each) in zstd
    Parquet, one row group per video; read it back. Returns (per-video {col: [planes]}, bytes on
    disk, read+decompress seconds)."""
    out_rows = []
    for row in rows:
        r = {VIDEO_ID: row[VIDEO_ID], RGB: row[RGB]}
        for col in (FLOW_U, FLOW_V):
            r[col] = [
                cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE).tobytes()
                for b in row[col]
            ]
        img = cv2.imdecode(np.frombuffer(row[RGB][0], np.uint8), cv2.IMREAD_COLOR)
        r["shape"] = list(img.shape[:2])
        out_rows.append(r)
    pq.write_table(
        pa.Table.from_pylist(out_rows),
        path,
        row_group_size=1,
        compression="zstd",
        compression_level=level,
    )
    size = os.path.getsize(path)
    start = time.perf_counter()
    table = pq.read_table(path)
    planes = []
    for i in range(table.num_rows):
        h, w = table.column("shape")[i].as_py()
        d = {}
        for col in (FLOW_U, FLOW_V):
            d[col] = [
                np.frombuffer(b.as_buffer(), np.uint8).reshape(h, w)
                for b in table.column(col)[i].values
            ]
        planes.append(d)
    return planes, size, time.perf_counter() - start


def jpeg_bytes(rows: list[dict]) -> dict[str, int]:
    return {c: sum(len(b) for r in rows for b in r[c]) for c in (RGB, FLOW_U, FLOW_V)}


def gpu_decode(rows, files, args) -> None:
    """``--decode device``: the CPU side plans clips and ships JPEG bytes
    (stm.data.device_clips.plan_train_batch, one core), the device decodes a micro-batch's
    JPEGs in one batched decode_jpeg call and crops / resizes / flips there (DeviceClipDecoder).
    Both sides are timed apart: the plan rate per core is what a Ray Data worker delivers, the
    decoder rate is the device time it takes from the training step."""
    import torch

    from stm.data.device_clips import DeviceClipDecoder, plan_train_batch

    if args.gpu_device == "cuda" and not torch.cuda.is_available():
        print("gpu: skipped: no CUDA")
        return
    dev = torch.device(args.gpu_device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # a per-core figure, like the other modes
    decoder = DeviceClipDecoder(args.crop_size, args.flow_length, dev)
    columns = [c for c in CLIP_COLUMNS if c in rows[0]]
    ids = {r[VIDEO_ID] for r in rows}

    def plans(epoch: int) -> list:
        """Read the shards as Arrow (as Ray Data's read_parquet does: no Python conversion of
        the JPEG lists) and plan every video's clip, bn_batch videos per batch."""
        nonlocal read_s
        t0 = time.perf_counter()
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        table = table.filter(pa.compute.is_in(table[VIDEO_ID], pa.array(sorted(ids))))
        read_s += time.perf_counter() - t0
        return [
            plan_train_batch(
                table.slice(i, args.bn_batch),
                epoch=epoch,
                seed=0,
                num_chunks=args.chunks,
                flow_length=args.flow_length,
                crop_size=args.crop_size,
            )
            for i in range(0, table.num_rows, args.bn_batch)
        ]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    read_s = 0.0
    for batch in plans(0):  # warm-up (nvJPEG handles, kernels)
        decoder(batch)
    sync()
    plan_s = decode_s = read_s = 0.0
    jpegs = shipped = 0
    for ep in range(args.epochs):
        t0 = time.perf_counter()
        batches = plans(ep + 1)
        plan_s += time.perf_counter() - t0
        jpegs += sum(len(b.column("rgb_jpeg").combine_chunks().flatten()) for b in batches)
        jpegs += sum(len(b.column("flow_jpeg").combine_chunks().flatten()) for b in batches)
        shipped += sum(b.nbytes for b in batches)
        t0 = time.perf_counter()
        for batch in batches:
            out = decoder(batch)
        sync()
        decode_s += time.perf_counter() - t0
    chunks = args.epochs * len(rows) * args.chunks
    name = torch.cuda.get_device_name() if cuda else "cpu (torchvision, one thread)"
    print(
        f"gpu: Parquet read + plan (CPU, one core): {chunks / plan_s:.1f} chunks/s per core "
        f"(read {read_s / chunks * 1e3:.2f} ms + plan {(plan_s - read_s) / chunks * 1e3:.2f} ms "
        "per chunk), "
        f"{shipped / chunks / 1e3:.1f} kB shipped per chunk (vs "
        f"{(3 + 2 * args.flow_length) * args.crop_size**2 / 1e3:.1f} kB of decoded uint8)"
    )
    print(
        f"gpu: decode+crop+resize+flip on {name}: {chunks / decode_s:.1f} chunks/s "
        f"({jpegs / decode_s:.0f} JPEGs/s, {jpegs / chunks:.1f} JPEGs/chunk, micro-batches of "
        f"{args.bn_batch} videos); output {tuple(out['flow'].shape)}"
    )


def run_ray(data: str, args) -> None:
    """The real ingest of stm.train.ingest on Ray Data, iterated as the training loop does."""
    import ray
    import ray.data

    from stm.data.clips import TrainClipSampler
    from stm.train.ingest import CLIP_COLUMNS as INGEST_COLUMNS
    from stm.train.ingest import _clips

    cores = os.cpu_count()
    from bench_ray import start_local_ray

    start_local_ray(cores)
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, root = resolve(data)
    files = shard_files(data)
    sampler = TrainClipSampler(
        seed=None, num_chunks=args.chunks, flow_length=args.flow_length, crop_size=args.crop_size
    )
    rates = []
    for ep in range(args.epochs):
        ds = (
            ray.data.read_parquet(files, filesystem=fs)
            .select_columns(INGEST_COLUMNS)
            .randomize_block_order()
            .map_batches(
                _clips,
                batch_format="pyarrow",
                batch_size=args.bn_batch,
                fn_kwargs={"split": 1, "train": True, "sampler": sampler},
            )
        )
        start = time.perf_counter()
        chunks = 0
        for batch in ds.iter_torch_batches(batch_size=args.bn_batch, prefetch_batches=2):
            chunks += int(batch["rgb"].shape[0]) * int(batch["rgb"].shape[1])
        el = time.perf_counter() - start
        rates.append(chunks / el)
        print(
            f"ray: epoch {ep}: {chunks} chunks in {el:.2f} s = {chunks / el:.1f} chunks/s on "
            f"{cores} cores = {chunks / el / cores:.1f} chunks/s per core (includes the "
            f"per-epoch plan/launch; the first epoch also starts the workers)"
        )
    ray.shutdown()
    best = max(rates[1:] or rates)
    print(f"ray: best steady epoch {best:.1f} chunks/s = {best / cores:.1f} chunks/s per core")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    tmp = tempfile.mkdtemp(prefix="stm-ingest-bench-")
    data = args.data
    if data is None:
        w, h = (int(x) for x in args.frame_size.split("x"))
        t0 = time.perf_counter()
        data = tmp
        generate_shards(data, args.videos, args.frames, w, h)
        print(
            f"data: generated {args.videos} videos x {args.frames} frames at {w}x{h} in "
            f"{time.perf_counter() - t0:.1f} s -> {data}"
        )
    files = shard_files(data)
    rows, read_s = read_rows(files)
    rows = [r for r in rows if r[NUM_FRAMES] >= 2]
    h, w = cv2.imdecode(np.frombuffer(rows[0][RGB][0], np.uint8), cv2.IMREAD_COLOR).shape[:2]
    frames = sum(r[NUM_FRAMES] for r in rows)
    print(
        f"ingest_throughput: {datetime.date.today()} host={platform.node()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f} opencv={cv2.__version__} pyarrow={pa.__version__} "
        f"data={data} videos={len(rows)} frames={frames} ({w}x{h}) T={args.chunks} "
        f"L={args.flow_length} S={args.crop_size} epochs={args.epochs} "
        "(one clip per video per epoch)"
    )
    jb = jpeg_bytes(rows)
    print(
        f"bytes: JPEG rgb {jb[RGB] / 1e6:.2f} MB, flow {(jb[FLOW_U] + jb[FLOW_V]) / 1e6:.2f} MB "
        f"({(jb[FLOW_U] + jb[FLOW_V]) / max(frames - len(rows), 1) / 2e3:.1f} kB per flow plane); "
        f"Parquet files on disk {sum(os.path.getsize(resolve(f)[1]) for f in files) / 1e6:.2f} MB"
    )
    results = {}
    if "stages" in args.modes:
        results["jpeg"] = run_staged(rows, read_s, args, "stages (JPEG flow, full decode)")
    if "sampler" in args.modes:
        start = time.perf_counter()
        for ep in range(args.epochs):
            for i in range(0, len(rows), args.bn_batch):
                batch = {c: [r[c] for r in rows[i : i + args.bn_batch]] for c in CLIP_COLUMNS}
                train_batch(
                    batch,
                    epoch=ep,
                    seed=0,
                    num_chunks=args.chunks,
                    flow_length=args.flow_length,
                    crop_size=args.crop_size,
                )
        el = time.perf_counter() - start + read_s * args.epochs
        rate = args.epochs * len(rows) * args.chunks / el
        print(
            f"sampler: stm.data.clips.train_batch {rate:.1f} chunks/s on one core "
            f"({1e3 / rate:.2f} ms/chunk, read included)"
        )
    if "reduced" in args.modes:
        results["reduced"] = run_staged(
            rows, read_s, args, "reduced (flow JPEG decoded at 1/2 size)", flow_reduce=2
        )
    if "rawflow" in args.modes:
        path = os.path.join(tmp, "rawflow.parquet")
        planes, size, raw_read = raw_flow_table(rows, path, args.zstd_level)
        jpeg_flow = jb[FLOW_U] + jb[FLOW_V]
        raw_plain = sum(p.nbytes for d in planes for c in (FLOW_U, FLOW_V) for p in d[c])
        print(
            f"rawflow: zstd-{args.zstd_level} Parquet {size / 1e6:.2f} MB "
            f"(RGB JPEG {jb[RGB] / 1e6:.2f} MB + raw flow {raw_plain / 1e6:.2f} MB before zstd) "
            f"vs flow JPEG {jpeg_flow / 1e6:.2f} MB: "
            f"flow on disk x{(size - jb[RGB]) / jpeg_flow:.2f}; read+decompress {raw_read:.2f} s "
            f"per epoch"
        )
        results["rawflow"] = run_staged(
            rows, raw_read, args, "rawflow (raw uint8 flow, zstd Parquet)", raw=planes
        )
    if "gpu" in args.modes:
        gpu_decode(rows, files, args)
    if "ray" in args.modes:
        run_ray(data, args)
    if results:
        base = results.get("jpeg")
        summary = ", ".join(
            f"{k} {v:.1f}" + (f" (x{v / base:.2f})" if base else "") for k, v in results.items()
        )
        print(f"summary: chunks/s per core: {summary}")


if __name__ == "__main__":
    main()
