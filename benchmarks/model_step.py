"""Forward+backward throughput of the two-stream multiplier network, plain PyTorch (no Ray).

Prints clips/s (one clip = one chunk: an RGB frame and its 2L-channel flow stack) for a chosen
config, on CPU or CUDA; on CUDA with bf16 autocast and channels_last, optionally compiled.

    python benchmarks/model_step.py                                  # small config, CPU
    python benchmarks/model_step.py --device cuda --appearance-arch resnet50 \
        --motion-arch resnet152 --videos 4 --chunks 5 --size 224 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.config import ARCHS, FUSIONS, TEMPORALS  # noqa: E402
from stm.model import ModelConfig, build_model, to_channels_last  # noqa: E402
from stm.train.steps import autocast  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--appearance-arch", default="resnet18", choices=ARCHS)
    p.add_argument("--motion-arch", default="resnet18", choices=ARCHS)
    p.add_argument("--fusion", default="residual_mul", choices=FUSIONS)
    p.add_argument("--temporal", default="residual_all", choices=TEMPORALS)
    p.add_argument("--videos", type=int, default=2, help="videos per step (the BN batch)")
    p.add_argument("--chunks", type=int, default=5, help="chunks per video (T)")
    p.add_argument("--size", type=int, default=112, help="crop size")
    p.add_argument("--flow-length", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
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
        help="stm.model.to_channels_last (default: on CUDA only)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = ModelConfig(
        num_classes=101,
        appearance_arch=args.appearance_arch,
        motion_arch=args.motion_arch,
        flow_length=args.flow_length,
        fusion=args.fusion,
        temporal=args.temporal,
    )
    model = build_model(cfg).to(device).train()
    channels_last = cuda if args.channels_last is None else args.channels_last
    if channels_last:
        to_channels_last(model)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    b, t, s = args.videos, args.chunks, args.size
    rgb = torch.randn(b, t, 3, s, s, device=device)
    flow = torch.randn(b, t, 2 * args.flow_length, s, s, device=device)
    labels = torch.randint(0, cfg.num_classes, (b,), device=device)
    use_bf16 = cuda if args.bf16 is None else args.bf16

    def step() -> None:
        with autocast(device, use_bf16):
            out = step_model(rgb, flow)
            loss = F.cross_entropy(out.appearance, labels) + F.cross_entropy(out.motion, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    clips = args.steps * b * t
    print(
        f"model_step: {args.appearance_arch}+{args.motion_arch} fusion={args.fusion} "
        f"temporal={args.temporal} size={s} videos={b} chunks={t} device={device.type} "
        f"bf16={use_bf16} channels_last={channels_last} compile={args.compile} threads="
        f"{torch.get_num_threads()}: {clips / elapsed:.1f} clips/s "
        f"({elapsed / args.steps * 1e3:.0f} ms/step)"
    )


if __name__ == "__main__":
    main()
