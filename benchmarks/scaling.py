"""Expected training throughput at 1, 8 and 64 GPUs, on paper: arithmetic from a per-GPU step
rate (``benchmarks/train_step.py`` prints the command with its measured rate), the ring
all-reduce of both streams' gradients once per update, and the ingest rate per CPU core
(``benchmarks/ingest_throughput.py``). No torch, no stm: nothing is run.

    python benchmarks/scaling.py --chunks-per-s 4050 --ingest-per-core 45
"""

from __future__ import annotations

import argparse

PAPER_PARAMS = 84_209_930  # R50 + R152, residual_mul, residual_all, L=10, 101 classes (counted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chunks-per-s", type=float, required=True, help="per-GPU step rate")
    p.add_argument(
        "--params", type=int, default=PAPER_PARAMS, help="model parameters (default: the paper's)"
    )
    p.add_argument("--chunks", type=int, default=5, help="chunks per video (T)")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chunks_per_s, params, chunks_per_video = args.chunks_per_s, args.params, args.chunks
    grad_gb = params * args.grad_bytes / 1e9
    ingest = args.ingest_per_core * args.cpus_per_gpu
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


if __name__ == "__main__":
    main()
