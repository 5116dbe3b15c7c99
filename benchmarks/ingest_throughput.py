"""Training-ingest throughput: chunks/s per CPU core delivered by the clip pipeline, with the
breakdown (Parquet read, JPEG decode, crop/resize/flip, collation) and the alternatives that
remove the decode bottleneck, side by side.

One *chunk* is an RGB frame and its 2L-channel flow stack (1 + 2L = 21 JPEGs at L=10, fewer
when the stacks of a clip overlap). Modes (all in this one run, on the same shards):

  stages     one process, the steps of stm.data.clips.train_clip timed apart: Parquet read as
             Arrow + batch_rows (read), FrameCache decodes (decode), chunk (crop/resize/flip),
             stack_clips (collate); the clip's random choices from sample_train_plan
  sampler    one process, stm.data.clips.train_batch end to end on Arrow batches of --bn-batch
             videos (what a Ray Data task runs)
  reduced    "cheaper sampling": flow JPEGs decoded at half size by libjpeg's DCT scaling
             (cv2.IMREAD_REDUCED_GRAYSCALE_2), the crop box halved, then resized to S as before
  rawflow    flow stored as raw uint8 planes in zstd-compressed Parquet instead of JPEG (built
             here from the JPEG shards; stm's shard format is unchanged): bytes on disk and the
             read + crop cost; the RGB frame stays JPEG
  gpu        --decode device (stm.data.device_clips): clips planned on the CPU (JPEG bytes
             shipped), then decoded in one batched torchvision.io.decode_jpeg call per
             micro-batch and cropped / resized / flipped on CUDA (skipped without CUDA;
             --gpu-device cpu runs the same code on the CPU)
  ray        the job's Ray Data ingest: one worker's epoch of stm.train.ingest.epoch_dataset,
             iterated by stm.train.loop.train_batches as a worker does, chunks/s per CPU core

Without --data, the shards are generated (benchmarks/bench_data.py).

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
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_data import planned_batches, shard_table, write_shards  # noqa: E402

from stm.data.clips import (  # noqa: E402
    FrameCache,
    TrainClipSpec,
    batch_rows,
    chunk,
    crop_resize,
    flow_stack_indices,
    sample_train_plan,
    stack_clips,
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
    decode_jpeg,
    list_parquet,
    resolve,
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


def shard_files(data: str) -> list[str]:
    fs, root = resolve(data)
    return list_parquet(fs, f"{root.rstrip('/')}/{SHARDS_DIR}")


def read_table(files: list[str]) -> tuple[pa.Table, float]:
    """The clip columns of the shards as Arrow, as Ray Data's read_parquet hands them to the
    sampler (videos of >= 2 frames), and the seconds it took."""
    start = time.perf_counter()
    table = pa.concat_tables([pq.read_table(f, columns=CLIP_COLUMNS) for f in files])
    table = table.filter(pc.greater_equal(table[NUM_FRAMES], 2))
    return table, time.perf_counter() - start


# --- one clip, stage by stage -------------------------------------------------------------------


class HalfFlowFrames(FrameCache):
    """stm's FrameCache, but the flow JPEGs are decoded at half size (the "reduced" variant)."""

    def __init__(self, row):
        super().__init__(row)
        self.row, self.half = row, {}

    def get(self, column: str, index: int) -> np.ndarray:
        if column == RGB:
            return super().get(column, index)
        key = (column, int(index))
        if key not in self.half:
            buf = np.frombuffer(self.row[column][int(index)], np.uint8)
            self.half[key] = cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_2)
        return self.half[key]


class RawFlowFrames(FrameCache):
    """stm's FrameCache, but the flow planes are raw uint8 already in memory (no decode)."""

    def __init__(self, row, planes: dict[str, list[np.ndarray]]):
        super().__init__(row)
        self.planes = planes

    def get(self, column: str, index: int) -> np.ndarray:
        return super().get(column, index) if column == RGB else self.planes[column][int(index)]


def half_flow_chunk(frames, t: int, idx, box, s: int, flip: bool, flow_out) -> np.ndarray:
    """``chunk`` for half-size flow planes (crop box halved for them); returns the RGB."""
    fbox = type(box)(*(c // 2 for c in box))
    for j, k in enumerate(idx):
        u = crop_resize(frames.get(FLOW_U, k), fbox, s, s, flip)
        flow_out[2 * j] = 255 - u if flip else u
        flow_out[2 * j + 1] = crop_resize(frames.get(FLOW_V, k), fbox, s, s, flip)
    return crop_resize(frames.get(RGB, t), box, s, s, flip).transpose(2, 0, 1)


def clip_spec(args) -> TrainClipSpec:
    """The clip recipe of the command line (--chunks, --flow-length, --crop-size)."""
    return TrainClipSpec(
        num_chunks=args.chunks, flow_length=args.flow_length, crop_size=args.crop_size
    )


def staged_epoch(rows, args, rng, frames_of) -> dict[str, float]:
    """Seconds per stage for one clip per video (decode, augment, collate), JPEG count;
    ``frames_of(i, row)``: video i's frame source (FrameCache or a variant)."""
    t_dec = t_aug = t_col = 0.0
    jpegs = 0
    s, num_chunks, length = args.crop_size, args.chunks, args.flow_length
    spec = clip_spec(args)
    clips = []
    for vi, row in enumerate(rows):
        n, hw = int(row[NUM_FRAMES]), (int(row[HEIGHT]), int(row[WIDTH]))
        times, box, flip = sample_train_plan(n, lambda _, hw=hw: hw, spec, rng=rng)
        idx = flow_stack_indices(times, n - 1, length)  # (T, L)
        need = np.unique(idx)
        t0 = time.perf_counter()
        frames = frames_of(vi, row)
        for t in times:
            frames.get(RGB, t)
        for col in (FLOW_U, FLOW_V):
            for k in need:
                frames.get(col, k)
        raw = isinstance(frames, RawFlowFrames)
        jpegs += len(set(times.tolist())) + (0 if raw else 2 * len(need))
        t1 = time.perf_counter()
        rgb = np.empty((num_chunks, 3, s, s), np.uint8)
        flow = np.empty((num_chunks, 2 * length, s, s), np.uint8)
        for i, t in enumerate(times):
            if isinstance(frames, HalfFlowFrames):
                rgb[i] = half_flow_chunk(frames, int(t), idx[i], box, s, flip, flow[i])
            else:
                rgb[i] = chunk(frames, int(t), idx[i], box, s, s, flip, flow[i])[0]
        t2 = time.perf_counter()
        clips.append({"rgb": rgb, "flow": flow, "label": row[LABEL]})
        if len(clips) == args.bn_batch or vi == len(rows) - 1:
            stack_clips(clips, num_chunks, length, (s, s))
            clips = []
        t3 = time.perf_counter()
        t_dec, t_aug, t_col = t_dec + t1 - t0, t_aug + t2 - t1, t_col + t3 - t2
    return {"decode": t_dec, "augment": t_aug, "collate": t_col, "jpegs": jpegs}


def run_staged(rows, read_s, args, label, frames_of=lambda _, row: FrameCache(row)) -> float:
    """Print the per-chunk breakdown of ``args.epochs`` epochs; return chunks/s on one core."""
    rng = np.random.default_rng(1)
    tot = {"decode": 0.0, "augment": 0.0, "collate": 0.0, "jpegs": 0}
    for _ in range(args.epochs):
        for k, v in staged_epoch(rows, args, rng, frames_of).items():
            tot[k] += v
    chunks = args.epochs * len(rows) * args.chunks
    # A real epoch reads each video row once: the read is charged once per epoch.
    read = read_s * args.epochs
    total = read + tot["decode"] + tot["augment"] + tot["collate"]
    ms = {k: 1e3 * v / chunks for k, v in (("read", read), *tot.items()) if k != "jpegs"}
    rate = chunks / total
    print(
        f"{label}: {rate:.1f} chunks/s on one core ({1e3 / rate:.2f} ms/chunk): "
        f"read (Parquet + batch_rows) "
        f"{ms['read']:.2f} ms, decode {ms['decode']:.2f} ms "
        f"({tot['jpegs'] / chunks:.1f} JPEGs/chunk), "
        f"crop/resize/flip {ms['augment']:.2f} ms, collate {ms['collate']:.2f} ms"
    )
    return rate


def checksum_cost(rows) -> None:
    """What the integrity check adds to a decode: crc32 of a JPEG (``shards.check_jpeg``, which
    every ``FrameCache`` read runs, included in the decode stage above) against decoding it."""
    jpegs = [row[c][k] for row in rows for c in (RGB, FLOW_U) for k in range(len(row[c]))]
    start = time.perf_counter()
    for j in jpegs:
        zlib.crc32(j)
    crc = (time.perf_counter() - start) / len(jpegs)
    start = time.perf_counter()
    for j in jpegs:
        cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_UNCHANGED)
    dec = (time.perf_counter() - start) / len(jpegs)
    print(
        f"checksums: crc32 {1e6 * crc:.1f} us per JPEG against {1e6 * dec:.1f} us to decode it "
        f"({100 * crc / dec:.1f}% of the decode; {len(jpegs)} RGB and flow-u JPEGs)"
    )


# --- alternatives -------------------------------------------------------------------------------


def raw_flow_table(table: pa.Table, rows, path: str, level: int) -> tuple[list[dict], int, float]:
    """Write the videos' flow as raw uint8 planes (list<binary>, H*W bytes each) next to their
    RGB JPEGs in zstd Parquet, one row group per video; read it back. Returns (per-video
    {col: [planes]}, bytes on disk, read+decompress seconds)."""
    out = table.select([VIDEO_ID, RGB, HEIGHT, WIDTH])
    for col in (FLOW_U, FLOW_V):
        gray = [[decode_jpeg(b, gray=True).tobytes() for b in r[col]] for r in rows]
        out = out.append_column(col, pa.array(gray, pa.list_(pa.binary())))
    pq.write_table(out, path, row_group_size=1, compression="zstd", compression_level=level)
    size = os.path.getsize(path)
    start = time.perf_counter()
    back = pq.read_table(path)
    shapes = zip(back[HEIGHT].to_pylist(), back[WIDTH].to_pylist())
    planes = [
        {
            col: [
                np.frombuffer(b.as_buffer(), np.uint8).reshape(h, w)
                for b in back.column(col)[i].values
            ]
            for col in (FLOW_U, FLOW_V)
        }
        for i, (h, w) in enumerate(shapes)
    ]
    return planes, size, time.perf_counter() - start


def jpeg_bytes(table: pa.Table) -> dict[str, int]:
    flat = {c: pc.list_flatten(table[c]) for c in (RGB, FLOW_U, FLOW_V)}
    return {c: pc.sum(pc.binary_length(v)).as_py() for c, v in flat.items()}


def gpu_decode(files, videos: int, args) -> None:
    """``--decode device``: the CPU side plans clips and ships JPEG bytes
    (stm.data.device_clips.plan_train_batch, one core), the device decodes a micro-batch's
    JPEGs in one batched decode_jpeg call and crops / resizes / flips there (DeviceClipDecoder).
    Both sides are timed apart: the plan rate per core is what a Ray Data worker delivers, the
    decoder rate is the device time it takes from the training step."""
    import torch

    from stm.data.device_clips import DeviceClipDecoder

    if args.gpu_device == "cuda" and not torch.cuda.is_available():
        print("gpu: skipped: no CUDA")
        return
    dev = torch.device(args.gpu_device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # a per-core figure, like the other modes
    decoder = DeviceClipDecoder(clip_spec(args), dev)

    def plans(epoch: int) -> list:
        """Read the shards as Arrow (no Python conversion of the JPEG lists) and plan every
        video's clip, bn_batch videos per batch."""
        nonlocal read_s
        table, seconds = read_table(files)
        read_s += seconds
        return planned_batches(
            table,
            [epoch],
            batch_size=args.bn_batch,
            num_chunks=args.chunks,
            flow_length=args.flow_length,
            crop_size=args.crop_size,
        )

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
    chunks = args.epochs * videos * args.chunks
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
    """The job's ingest on Ray Data (stm.train.ingest.epoch_dataset), iterated as a training
    worker does (stm.train.loop.train_batches)."""
    import ray.data
    import torch
    from bench_ray import start_local_ray

    from stm.config import ModelConfig, TrainConfig
    from stm.train.ingest import epoch_dataset, local_shuffle_seed, train_inputs
    from stm.train.loop import train_batches

    cores = os.cpu_count()
    start_local_ray(cores)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TrainConfig(
        data=data,
        model=ModelConfig(flow_length=args.flow_length),
        num_chunks=args.chunks,
        crop_size=args.crop_size,
        bn_batch=args.bn_batch,
        batch_size=args.bn_batch,
    )
    inputs = train_inputs(cfg)
    rates = []
    for ep in range(args.epochs):
        start = time.perf_counter()
        chunks = 0
        train = epoch_dataset(cfg, inputs, ep + 1, 0, 1)  # one worker's epoch, as the loop's
        seed = local_shuffle_seed(cfg.seed, ep + 1, 0)
        for batch in train_batches(train, cfg, torch.device("cpu"), shuffle_seed=seed):
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
        data = write_shards(tmp, shard_table(args.videos, args.frames, w, h))
        print(
            f"data: generated {args.videos} videos x {args.frames} frames at {w}x{h} in "
            f"{time.perf_counter() - t0:.1f} s -> {data}"
        )
    files = shard_files(data)
    table, parquet_s = read_table(files)
    t0 = time.perf_counter()
    rows = batch_rows(table)
    read_s = parquet_s + time.perf_counter() - t0
    h, w = rows[0][HEIGHT], rows[0][WIDTH]
    frames = pc.sum(table[NUM_FRAMES]).as_py()
    print(
        f"ingest_throughput: {datetime.date.today()} host={platform.node()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f} opencv={cv2.__version__} pyarrow={pa.__version__} "
        f"data={data} videos={len(rows)} frames={frames} ({w}x{h}) T={args.chunks} "
        f"L={args.flow_length} S={args.crop_size} epochs={args.epochs} "
        "(one clip per video per epoch)"
    )
    jb = jpeg_bytes(table)
    print(
        f"bytes: JPEG rgb {jb[RGB] / 1e6:.2f} MB, flow {(jb[FLOW_U] + jb[FLOW_V]) / 1e6:.2f} MB "
        f"({(jb[FLOW_U] + jb[FLOW_V]) / max(frames - len(rows), 1) / 2e3:.1f} kB per flow plane); "
        f"Parquet files on disk {sum(os.path.getsize(resolve(f)[1]) for f in files) / 1e6:.2f} MB"
    )
    results = {}
    if "stages" in args.modes:
        results["jpeg"] = run_staged(rows, read_s, args, "stages (JPEG flow, full decode)")
        checksum_cost(rows)
    if "sampler" in args.modes:
        spec = clip_spec(args)
        start = time.perf_counter()
        for ep in range(args.epochs):
            for i in range(0, table.num_rows, args.bn_batch):
                train_batch(table.slice(i, args.bn_batch), spec, epoch=ep, seed=0)
        el = time.perf_counter() - start + parquet_s * args.epochs
        rate = args.epochs * len(rows) * args.chunks / el
        print(
            f"sampler: stm.data.clips.train_batch {rate:.1f} chunks/s on one core "
            f"({1e3 / rate:.2f} ms/chunk, read included)"
        )
    if "reduced" in args.modes:
        results["reduced"] = run_staged(
            rows,
            read_s,
            args,
            "reduced (flow JPEG decoded at 1/2 size)",
            lambda _, row: HalfFlowFrames(row),
        )
    if "rawflow" in args.modes:
        path = os.path.join(tmp, "rawflow.parquet")
        planes, size, raw_read = raw_flow_table(table, rows, path, args.zstd_level)
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
            rows,
            raw_read,
            args,
            "rawflow (raw uint8 flow, zstd Parquet)",
            lambda i, row: RawFlowFrames(row, planes[i]),
        )
    if "gpu" in args.modes:
        gpu_decode(files, len(rows), args)
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
