"""Training-step throughput and MFU of the fused two-stream network, plain PyTorch (no Ray unless
``--ray``), plus a scaling estimate for 1, 8 and 64 GPUs.

One *chunk* is an RGB frame and its 2L-channel flow stack. FLOPs per chunk are counted with
``torch.utils.flop_counter.FlopCounterMode`` on a forward+backward pass (on the meta device, so
counting is instant) and printed next to the issue's 97.6 GFLOP estimate. MFU = counted model
FLOP/s / the device's peak (bf16 dense; table below, or ``--peak-tflops``). On CPU only the
achieved GFLOP/s is printed.

Two loops are timed on the same synthetic uint8 micro-batches (already on the device):
  plain: forward, the two losses, backward, an SGD update every ``--accum`` micro-batches;
  stm:   ``stm.train.steps.train_one_epoch`` (model_inputs normalisation on the device, per
         micro-batch loss/accuracy read-back, gradient accumulation), the real training step.
  stm+decode (``--decode-jpeg``): the stm loop fed planned JPEG clips that it decodes, crops
         and resizes on the device first (``--decode device``), and the decoder alone.

    python benchmarks/train_step.py --smoke-test                    # seconds, CPU
    python benchmarks/train_step.py                                 # CPU: small config
    python benchmarks/train_step.py --preset paper --compile both   # CUDA: R50+R152, 224, bf16
    python benchmarks/train_step.py --ray                           # + Ray Train overhead ratio
    python benchmarks/train_step.py --decode-jpeg                   # + JPEG decode in the loop
    python benchmarks/train_step.py --scaling-only --chunks-per-s 2000 --ingest-per-core 60
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.config import ARCHS  # noqa: E402
from stm.model import ModelConfig, build_model, to_channels_last  # noqa: E402
from stm.train.steps import autocast, train_one_epoch  # noqa: E402

ISSUE_GFLOP_PER_CHUNK = 97.6  # the issue's estimate for R50 + R152, 224x224, L=10, fwd+bwd
# Dense bf16 peak TFLOP/s (no sparsity), matched by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}
PRESETS = {
    # appearance, motion, crop size, videos per micro-batch (BN batch), chunks per video
    "paper": ("resnet50", "resnet152", 224, 4, 5),
    "small": ("resnet18", "resnet18", 112, 2, 5),
    "smoke": ("resnet18", "resnet18", 32, 1, 3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="sizes: paper (R50+R152, 224, 4 videos x 5 chunks) is the CUDA default, small "
        "(R18+R18, 112, 2x5) the CPU default",
    )
    p.add_argument("--appearance-arch", choices=ARCHS, help="override the preset")
    p.add_argument("--motion-arch", choices=ARCHS, help="override the preset")
    p.add_argument("--size", type=int, help="crop size (override the preset)")
    p.add_argument("--videos", type=int, help="videos per micro-batch, the BN batch")
    p.add_argument("--chunks", type=int, help="chunks per video (T)")
    p.add_argument("--flow-length", type=int, default=10, help="L (2L flow channels)")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimiser update")
    p.add_argument("--steps", type=int, default=8, help="timed micro-batches (rounded to --accum)")
    p.add_argument("--warmup", type=int, default=4, help="untimed micro-batches first")
    p.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=None,
        help="torch.compile the model (default: both on CUDA, off on CPU)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on CUDA only)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last weights and activations, stm.model.to_channels_last (default: on "
        "CUDA only)",
    )
    p.add_argument(
        "--decode-jpeg",
        action="store_true",
        help="also time the stm loop fed planned JPEG clips decoded on the device in the loop "
        "(--decode device: stm.data.device_clips), frames of --frame-size",
    )
    p.add_argument("--frame-size", default="340x256", help="WxH of the --decode-jpeg frames")
    p.add_argument("--peak-tflops", type=float, help="device peak, overrides the name table")
    p.add_argument("--ray", action="store_true", help="also time a 1-worker Ray TorchTrainer")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    # scaling estimate
    p.add_argument("--scaling-only", action="store_true", help="print the scaling table only")
    p.add_argument("--chunks-per-s", type=float, help="per-GPU step rate for --scaling-only")
    p.add_argument(
        "--ingest-per-core",
        type=float,
        default=95.0,
        help="ingest chunks/s per CPU core (benchmarks/ingest_throughput.py; 95 = issue's decode "
        "estimate)",
    )
    p.add_argument("--cpus-per-gpu", type=int, default=16)
    p.add_argument("--update-videos", type=int, default=128, help="videos per update (paper)")
    p.add_argument(
        "--busbw-intra", type=float, default=360.0, help="all-reduce bus GB/s inside a node"
    )
    p.add_argument(
        "--busbw-inter",
        type=float,
        default=40.0,
        help="all-reduce bus GB/s per GPU across nodes (8x400 Gb/s NICs per 8-GPU node ~ 50 GB/s "
        "line rate per GPU)",
    )
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element (fp32)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("smoke" if args.smoke_test else "paper" if cuda else "small")
    a, m, s, v, t = PRESETS[preset]
    args.preset = preset
    args.appearance_arch = args.appearance_arch or a
    args.motion_arch = args.motion_arch or m
    args.size = args.size or s
    args.videos = args.videos or v
    args.chunks = args.chunks or t
    if args.smoke_test:
        args.steps, args.warmup, args.accum = 2, 1, 2
    if args.compile is None:
        args.compile = "both" if cuda else "off"
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    return args


def model_config(args: argparse.Namespace, num_classes: int = 101) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes,
        appearance_arch=args.appearance_arch,
        motion_arch=args.motion_arch,
        flow_length=args.flow_length,
        fusion="residual_mul",
        temporal="residual_all",
    )


def count_flops(cfg: ModelConfig, size: int, chunks: int) -> tuple[float, float, int]:
    """(forward+backward FLOPs per chunk, forward FLOPs per chunk, parameters) on the meta device:
    one video of ``chunks`` chunks at ``size`` x ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(cfg).train()
        rgb = torch.randn(1, chunks, 3, size, size)
        flow = torch.randn(1, chunks, 2 * cfg.flow_length, size, size)
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fwd:
        out = model(rgb, flow)
    loss = F.cross_entropy(out.appearance, labels) + F.cross_entropy(out.motion, labels)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return (f + b) / chunks, f / chunks, params


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf, name
    return None, name


def synthetic_batches(args, device, n: int, num_classes: int = 101) -> list[dict]:
    """``n`` uint8 micro-batches as the ingest delivers them (B, T, C, S, S), on ``device``."""
    g = torch.Generator().manual_seed(0)
    b, t, s = args.videos, args.chunks, args.size
    base = {
        "rgb": torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8, generator=g),
        "flow": torch.randint(
            0, 256, (b, t, 2 * args.flow_length, s, s), dtype=torch.uint8, generator=g
        ),
        "label": torch.randint(0, num_classes, (b,), generator=g),
    }
    one = {k: v.to(device) for k, v in base.items()}
    return [one] * n  # the same tensors: the step's cost does not depend on the values


def jpeg_plans(args, n: int, num_classes: int = 101) -> list:
    """``n`` planned micro-batches (``--decode device``'s Ray Data output) of ``args.videos``
    videos whose frames are smooth random textures with noise at ``--frame-size``, JPEG q90
    (flow planes of ~10 kB, like real TV-L1 shards)."""
    import cv2
    import numpy as np
    import pyarrow as pa

    from stm.data.device_clips import plan_train_batch
    from stm.data.shards import encode_jpeg

    w, h = (int(x) for x in args.frame_size.split("x"))
    rng = np.random.default_rng(0)
    frames = max(40, args.chunks * 8)

    def image(channels: int) -> np.ndarray:
        coarse = rng.uniform(0, 255, (8, 10, channels)).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
        img = img + rng.normal(0, 4, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8).squeeze()

    rows = [
        {
            "video_id": f"bench/v{v}",
            "label": v % num_classes,
            "num_frames": frames,
            "height": h,
            "width": w,
            "rgb": [encode_jpeg(image(3)) for _ in range(frames)],
            "flow_u": [encode_jpeg(image(1)) for _ in range(frames - 1)],
            "flow_v": [encode_jpeg(image(1)) for _ in range(frames - 1)],
        }
        for v in range(args.videos)
    ]
    table = pa.Table.from_pylist(rows)
    return [
        plan_train_batch(
            table,
            epoch=i,
            seed=0,
            num_chunks=args.chunks,
            flow_length=args.flow_length,
            crop_size=args.size,
        )
        for i in range(n)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, device, compiled: bool):
    model = build_model(model_config(args)).to(device).train()
    if args.channels_last:
        to_channels_last(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    step_model = torch.compile(model) if compiled else model
    return model, step_model, opt


def plain_loop(step_model, opt, batches, args, device, bf16: bool) -> float:
    """Seconds for ``batches``: the minimal accumulated step (no read-back, no metrics)."""
    from stm.data.clips import to_model_inputs

    _sync(device)
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        rgb, flow = to_model_inputs(batch["rgb"], batch["flow"])
        with autocast(device, bf16):
            out = step_model(rgb, flow)
        loss = F.cross_entropy(out.appearance.float(), batch["label"]) + F.cross_entropy(
            out.motion.float(), batch["label"]
        )
        (loss / args.accum).backward()
        if (i + 1) % args.accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def stm_loop(step_model, opt, batches, args, device, bf16: bool) -> float:
    """Seconds for ``batches`` through ``stm.train.steps.train_one_epoch``."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(
        step_model,
        batches,
        opt,
        sched,
        stage="fused",
        accum_steps=args.accum,
        device=device,
        bf16=bf16,
    )
    _sync(device)
    return time.perf_counter() - start


def time_loops(args, device, compiled: bool, bf16: bool) -> dict[str, float]:
    """Chunks/s of the plain and the stm loop for one model (warm-up first, untimed)."""
    _, step_model, opt = make_model(args, device, compiled)
    n = max(args.accum, args.steps // args.accum * args.accum)
    warm = synthetic_batches(args, device, max(args.warmup, 1))
    t0 = time.perf_counter()
    plain_loop(step_model, opt, warm, args, device, bf16)  # includes compilation
    first = time.perf_counter() - t0
    batches = synthetic_batches(args, device, n)
    chunks = n * args.videos * args.chunks
    out = {"warmup_s": first}
    out["plain"] = chunks / plain_loop(step_model, opt, batches, args, device, bf16)
    out["stm"] = chunks / stm_loop(step_model, opt, batches, args, device, bf16)
    if args.decode_jpeg:
        from stm.data.device_clips import DeviceClipDecoder

        decoder = DeviceClipDecoder(args.size, args.flow_length, device)
        plans = jpeg_plans(args, n)
        decoder(plans[0])  # warm-up (nvJPEG handles, kernels)
        seconds = stm_loop(step_model, opt, map(decoder, plans), args, device, bf16)
        out["stm+decode"] = chunks / seconds
        _sync(device)
        start = time.perf_counter()
        for plan in plans:
            decoder(plan)
        _sync(device)
        out["decode"] = chunks / (time.perf_counter() - start)
    if device.type == "cuda":
        out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def ray_overhead(args, device, bf16: bool) -> None:
    """The same plain loop inside a 1-worker Ray TorchTrainer vs in this process, one run."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = torch.get_num_threads()
    n = max(args.accum, args.steps // args.accum * args.accum)
    # Train V2's Result.metrics holds only what came with a checkpoint: the worker also writes
    # its time to a file (the benchmark runs on one machine).
    out = os.path.join(tempfile.mkdtemp(prefix="stm-bench-"), "ray_seconds")
    cfg = {"args": vars(args), "n": n, "threads": threads, "bf16": bf16, "out": out}

    def worker(config):
        import ray.train
        import ray.train.torch

        torch.set_num_threads(config["threads"])  # Ray sets OMP threads to the worker's CPUs
        a = argparse.Namespace(**config["args"])
        dev = ray.train.torch.get_device()
        model = build_model(model_config(a)).to(dev).train()
        if a.channels_last:
            to_channels_last(model)
        model = ray.train.torch.prepare_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        plain_loop(model, opt, synthetic_batches(a, dev, max(a.warmup, 1)), a, dev, config["bf16"])
        seconds = plain_loop(
            model, opt, synthetic_batches(a, dev, config["n"]), a, dev, config["bf16"]
        )
        ray.train.report({"seconds": seconds})
        if ray.train.get_context().get_world_rank() == 0:  # one node: the driver reads it
            with open(config["out"], "w") as f:
                f.write(str(seconds))

    # The plain loop in this process, right before, on the same sizes (no compile).
    _, step_model, opt = make_model(args, device, False)
    plain_loop(
        step_model, opt, synthetic_batches(args, device, max(args.warmup, 1)), args, device, bf16
    )
    plain_s = plain_loop(step_model, opt, synthetic_batches(args, device, n), args, device, bf16)
    del step_model, opt

    from bench_ray import start_local_ray

    start_local_ray(os.cpu_count())
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=device.type == "cuda",
            resources_per_worker={"CPU": 1},
        ),
        run_config=RunConfig(name="train_step_bench", storage_path="/tmp/stm-bench-ray"),
    )
    trainer.fit()
    wall = time.perf_counter() - t0
    ray.shutdown()
    with open(out) as f:
        ray_s = float(f.read())
    chunks = n * args.videos * args.chunks
    print(
        f"ray_overhead: {n} micro-batches, plain loop {chunks / plain_s:.2f} chunks/s "
        f"({plain_s:.2f} s), same loop in a 1-worker TorchTrainer {chunks / ray_s:.2f} chunks/s "
        f"({ray_s:.2f} s): ratio ray/plain step time {ray_s / plain_s:.3f}; "
        f"trainer.fit() wall {wall:.1f} s (start-up + model build + warm-up + loop)"
    )


def scaling_table(args, chunks_per_s: float, params: int) -> None:
    """Expected throughput at 1, 8 and 64 GPUs from the step rate, the all-reduce of both
    streams' gradients once per update and the ingest rate."""
    grad_gb = params * args.grad_bytes / 1e9
    ingest = args.ingest_per_core * args.cpus_per_gpu
    chunks_per_video = args.chunks
    print(
        f"scaling: per-GPU step {chunks_per_s:.1f} chunks/s; gradients {params / 1e6:.1f} M "
        f"params x {args.grad_bytes} B = {grad_gb:.3f} GB all-reduced once per update of "
        f"{args.update_videos} videos x {chunks_per_video} chunks; ingest "
        f"{args.ingest_per_core:.1f} chunks/s/core x {args.cpus_per_gpu} cores = {ingest:.0f} "
        f"chunks/s per GPU; ring all-reduce time 2(N-1)/N x bytes / busbw "
        f"({args.busbw_intra:g} GB/s in a node of 8, {args.busbw_inter:g} GB/s across nodes), "
        f"not overlapped with compute (pessimistic)"
    )
    print(
        "| GPUs | chunks/update/GPU | compute s/update | all-reduce s | step-bound chunks/s "
        "| ingest-bound chunks/s | expected chunks/s | videos/s | efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for n in (1, 8, 64):
        per_gpu = args.update_videos * chunks_per_video / n
        compute = per_gpu / chunks_per_s
        busbw = args.busbw_intra if n <= 8 else args.busbw_inter
        comm = 0.0 if n == 1 else 2 * (n - 1) / n * grad_gb / busbw
        step_bound = n * per_gpu / (compute + comm)
        ingest_bound = n * ingest
        expected = min(step_bound, ingest_bound)
        base = base or expected
        print(
            f"| {n} | {per_gpu:.0f} | {compute:.3f} | {comm:.4f} | {step_bound:.0f} | "
            f"{ingest_bound:.0f} | {expected:.0f} | {expected / chunks_per_video:.0f} | "
            f"{expected / (n * base):.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = args.bf16
    cfg = model_config(args)
    print(
        f"train_step: {datetime.date.today()} host={platform.node()} torch={torch.__version__} "
        f"device={torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'} "
        f"cpus={os.cpu_count()} threads={torch.get_num_threads()} "
        f"load={os.getloadavg()[0]:.1f} preset={args.preset} "
        f"{args.appearance_arch}+{args.motion_arch} size={args.size} L={args.flow_length} "
        f"micro-batch={args.videos} videos x {args.chunks} chunks accum={args.accum} "
        f"bf16={bf16} channels_last={args.channels_last} ray_imported={'ray' in sys.modules}"
    )
    flops, fwd, params = count_flops(cfg, args.size, args.chunks)
    print(
        f"flops: counted {flops / 1e9:.2f} GFLOP/chunk forward+backward ({fwd / 1e9:.2f} forward) "
        f"at {args.size}x{args.size}; parameters {params / 1e6:.1f} M; issue's estimate for "
        f"R50+R152 at 224: {ISSUE_GFLOP_PER_CHUNK} GFLOP"
    )
    if args.scaling_only:
        if not args.chunks_per_s:
            raise SystemExit("--scaling-only needs --chunks-per-s")
        scaling_table(args, args.chunks_per_s, params)
        return
    peak, peak_src = peak_tflops(args, device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    best = 0.0
    for compiled in modes:
        r = time_loops(args, device, compiled, bf16)
        if "decode" in r:
            print(
                f"decode: compile={compiled}: DeviceClipDecoder alone {r['decode']:.1f} chunks/s "
                f"on {device} ({args.frame_size} JPEG frames, {args.videos} videos per call)"
            )
        for loop in [k for k in ("plain", "stm", "stm+decode") if k in r]:
            rate = r[loop]
            if loop != "stm+decode":  # the scaling table takes ingest apart
                best = max(best, rate)
            tflops = rate * flops / 1e12
            mfu = (
                f"MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s ({peak_src})"
                if peak
                else ("MFU n/a (no peak for this device)")
            )
            mem = f", peak mem {r['max_mem_gib']:.1f} GiB" if "max_mem_gib" in r else ""
            print(
                f"step: compile={compiled} loop={loop}: {rate:.2f} chunks/s, "
                f"{tflops * 1e3:.1f} GFLOP/s achieved, {mfu}{mem}; warm-up {r['warmup_s']:.1f} s"
            )
    if args.ray:
        ray_overhead(args, device, bf16)
    scaling_table(args, best, params)


if __name__ == "__main__":
    main()
