"""Training-step throughput and MFU of the fused two-stream network, plain PyTorch (no Ray unless
``--ray``); it ends with the command of the scaling estimate for 1, 8 and 64 GPUs at the measured
rate (``benchmarks/scaling.py``).

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
    python benchmarks/train_step.py --fusion residual_add --temporal none   # another variant
    python benchmarks/train_step.py --preset paper --flops-only     # FLOPs per chunk only
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
from stm.config import ARCHS, FUSIONS, TEMPORALS  # noqa: E402
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
    p.add_argument("--fusion", default="residual_mul", choices=FUSIONS, help="cross-stream gate")
    p.add_argument("--temporal", default="residual_all", choices=TEMPORALS, help="temporal filters")
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
    p.add_argument("--flops-only", action="store_true", help="count the FLOPs, time nothing")
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
        fusion=args.fusion,
        temporal=args.temporal,
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
    from stm.train.steps import to_model_inputs

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
        from bench_data import planned_batches, shard_table

        from stm.data.clips import TrainClipSpec
        from stm.data.device_clips import DeviceClipDecoder

        spec = TrainClipSpec(flow_length=args.flow_length, crop_size=args.size)
        decoder = DeviceClipDecoder(spec, device)
        w, h = (int(x) for x in args.frame_size.split("x"))
        table = shard_table(args.videos, max(40, args.chunks * 8), w, h)
        plans = planned_batches(
            table,
            range(n),
            batch_size=args.videos,
            num_chunks=args.chunks,
            flow_length=args.flow_length,
            crop_size=args.size,
        )
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = args.bf16
    cfg = model_config(args)
    variant = (
        f" fusion={args.fusion} temporal={args.temporal}"
        if (args.fusion, args.temporal) != ("residual_mul", "residual_all")
        else ""
    )
    print(
        f"train_step: {datetime.date.today()} host={platform.node()} torch={torch.__version__} "
        f"device={torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'} "
        f"cpus={os.cpu_count()} threads={torch.get_num_threads()} "
        f"load={os.getloadavg()[0]:.1f} preset={args.preset} "
        f"{args.appearance_arch}+{args.motion_arch}{variant} size={args.size} L={args.flow_length} "
        f"micro-batch={args.videos} videos x {args.chunks} chunks accum={args.accum} "
        f"bf16={bf16} channels_last={args.channels_last} ray_imported={'ray' in sys.modules}"
    )
    flops, fwd, params = count_flops(cfg, args.size, args.chunks)
    print(
        f"flops: counted {flops / 1e9:.2f} GFLOP/chunk forward+backward ({fwd / 1e9:.2f} forward) "
        f"at {args.size}x{args.size}; parameters {params / 1e6:.1f} M; issue's estimate for "
        f"R50+R152 at 224: {ISSUE_GFLOP_PER_CHUNK} GFLOP"
    )
    if args.flops_only:
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
    print(
        f"scaling: python benchmarks/scaling.py --chunks-per-s {best:.1f} --params {params} "
        f"--chunks {args.chunks}  # + --ingest-per-core from benchmarks/ingest_throughput.py"
    )


if __name__ == "__main__":
    main()
