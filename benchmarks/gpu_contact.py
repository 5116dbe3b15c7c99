"""The training path's first contact with a GPU, checked on a bare CUDA machine (plain PyTorch,
no Ray): what the CPU tests cannot show. Prints one ``check:`` line per check and exits 1 if
one fails.

  layout   the fused model under ``stm.model.to_channels_last`` gives the contiguous model's
           scores (fp32), and runs under bf16 autocast
  nccl     the loop's per-epoch reduction (``stm.train.loop.all_reduce_sum``) on an NCCL
           process group, which reduces only CUDA tensors
  syncs    host-device synchronisations inside ``train_one_epoch`` on device batches
           (``torch.cuda.set_sync_debug_mode``): one expected, the epoch's final read
  decode   ``DeviceClipDecoder`` on its side stream under allocator churn (blocks freed while
           kernels still read them, the torchvision#9606 hazard) gives the CPU decoder's clips

    python benchmarks/gpu_contact.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.config import ModelConfig  # noqa: E402
from stm.model import build_model, to_channels_last  # noqa: E402
from stm.train.steps import autocast, train_one_epoch  # noqa: E402

CFG = ModelConfig(num_classes=11, appearance_arch="resnet18", motion_arch="resnet18")


def inputs(device, b=2, t=5, s=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8, generator=g)
    flow = torch.randint(0, 256, (b, t, 2 * CFG.flow_length, s, s), dtype=torch.uint8, generator=g)
    label = torch.randint(0, CFG.num_classes, (b,), generator=g)
    return {"rgb": rgb.to(device), "flow": flow.to(device), "label": label.to(device)}


def check_layout(device) -> tuple[bool, str]:
    from stm.train.steps import to_model_inputs

    torch.manual_seed(0)
    model = build_model(CFG).to(device).eval()
    x = inputs(device)
    rgb, flow = to_model_inputs(x["rgb"], x["flow"])
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref = model(rgb, flow)
        to_channels_last(model)
        out = model(rgb, flow)
        with autocast(device, True):
            half = model(rgb, flow)
    err = max(
        float((o - r).abs().max() / r.abs().max())
        for o, r in ((out.appearance, ref.appearance), (out.motion, ref.motion))
    )
    ok = err < 1e-4 and half.appearance.dtype == torch.bfloat16
    return (
        ok,
        f"fp32 max |channels_last - contiguous| / max |scores| {err:.1e}, bf16 {half.motion.dtype}",
    )


def check_nccl(device) -> tuple[bool, str]:
    import torch.distributed as dist

    from stm.train.loop import all_reduce_sum

    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        values = np.array([[1.5, 2.0], [3.0, 4.0]])
        sums = all_reduce_sum(values, device)
    finally:
        dist.destroy_process_group()
    return bool(np.array_equal(sums, values)), f"world 1 NCCL sums {sums.tolist()}"


def check_syncs(device, micro_batches: int = 6) -> tuple[bool, str]:
    model = to_channels_last(build_model(CFG).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = [inputs(device, seed=i) for i in range(micro_batches)]
    train_one_epoch(  # warm-up: cuDNN autotuning and the allocator's first blocks
        model, batches[:2], opt, sched, stage="fused", accum_steps=2, device=device, bf16=True
    )
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(
                model, batches, opt, sched, stage="fused", accum_steps=3, device=device, bf16=True
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return len(syncs) <= 1, f"{len(syncs)} synchronising calls in {micro_batches} micro-batches"


def check_decode(device, rounds: int = 20) -> tuple[bool, str]:
    from bench_data import planned_batches, shard_table

    from stm.data.clips import TrainClipSpec
    from stm.data.device_clips import DeviceClipDecoder, wait_ready

    plans = planned_batches(
        shard_table(4, 40, 340, 256), range(4), batch_size=4, num_chunks=5, flow_length=10,
        crop_size=224,
    )  # fmt: skip
    cpu = DeviceClipDecoder(TrainClipSpec(), "cpu")
    gpu = DeviceClipDecoder(TrainClipSpec(), device)
    refs = [cpu(p) for p in plans]
    worst = 0
    a = torch.randn(4096, 4096, device=device)
    for r in range(rounds):
        # kernels queued on the compute stream that read blocks freed right after
        churn = [torch.randn(1 << 20, device=device) for _ in range(16)]
        _ = a @ a  # a long kernel ahead of the reads
        reads = [c.sum() for c in churn]
        del churn
        out = gpu(plans[r % len(plans)])
        wait_ready(out)
        ref = refs[r % len(plans)]
        for k in ("rgb", "flow"):
            diff = (out[k].cpu().int() - ref[k].int()).abs().max()
            worst = max(worst, int(diff))
        del reads
    torch.cuda.synchronize()
    return worst <= 8, f"{rounds} micro-batches, max |cuda - cpu| {worst} uint8 levels"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_contact: no CUDA device; nothing to check")
        return 0
    device = torch.device("cuda")
    print(
        f"gpu_contact: torch {torch.__version__} cuda {torch.version.cuda} "
        f"device={torch.cuda.get_device_name(device)}"
    )
    failed = 0
    for name, check in (
        ("layout", check_layout),
        ("nccl", check_nccl),
        ("syncs", check_syncs),
        ("decode", check_decode),
    ):
        try:
            ok, detail = check(device)
        except Exception as err:  # noqa: BLE001 - report every check, then fail
            ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        failed += not ok
        print(f"check: {name} {'ok' if ok else 'FAILED'}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
