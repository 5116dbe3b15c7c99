"""Videos to training shards (decode, optical flow, JPEG, Parquet) on Ray Data.

    python jobs/preprocess.py --source ucf101 --root VIDEOS --splits SPLITDIR --out OUT
    python jobs/preprocess.py --source hmdb51 --root VIDEOS --splits SPLITDIR --out OUT
    python jobs/preprocess.py --source folder --root VIDEOS --out OUT      # VIDEOS/<class>/<video>
    python jobs/preprocess.py --source synthetic --out OUT [--num-videos N] [--seed S]

OUT may be a URI (s3://bucket/prefix). Rerun the same command after an interruption: finished
videos are kept, the rest is done; videos that failed are redone only with --retry-failed.
Exit status: 0 when at most --max-failures of the videos failed, 1 otherwise, 2 for a usage error.

Output: OUT/shards/*.parquet (one row per video: RGB JPEGs, flow u/v JPEGs, label, splits),
OUT/manifest/*.parquet (one row per input video: ok | failed with the reason), OUT/classes.json,
OUT/dataset.json. The folder source has one split: a video is in the test set when a hash of its
group (the id without a UCF-style "_cNN" clip suffix) falls in the bottom 20%.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stm.data.preprocess import PreprocessConfig, UsageError, run_preprocess


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"preprocess: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    """Build the config from the command line."""
    d = PreprocessConfig()
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="ucf101 | hmdb51 | folder | synthetic")
    p.add_argument("--root", help="the videos (synthetic: where to write them, default OUT/videos)")
    p.add_argument("--splits", help="the split files' folder (ucf101, hmdb51); default --root")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument(
        "--flow", default=d.flow, help="tvl1 | tvl1-torch | dis | farneback (default tvl1)"
    )
    p.add_argument(
        "--short-side", type=int, help="resize to this short side (default 256; synthetic: native)"
    )
    p.add_argument("--max-frames", type=int, help="keep at most the first N frames of a video")
    p.add_argument("--max-failures", type=float, default=d.max_failures, help="default 0.01")
    p.add_argument("--num-videos", type=int, default=d.num_videos, help="synthetic only")
    p.add_argument("--seed", type=int, default=d.seed, help="synthetic only")
    p.add_argument(
        "--workers",
        type=int,
        help="flow actors, a fixed pool (default: the cluster's CPUs, growing with it)",
    )
    p.add_argument("--videos-per-shard", type=int, default=d.videos_per_shard)
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=d.gpus_per_worker,
        help="GPUs per flow actor, for --flow tvl1-torch on GPU nodes (default 0: CPU only; "
        "then --workers defaults to the cluster's GPUs / this)",
    )
    p.add_argument("--retry-failed", action="store_true", help="redo videos that failed before")
    a = p.parse_args(argv)
    return PreprocessConfig(
        source=a.source,
        root=a.root,
        splits=a.splits,
        out=a.out,
        flow=a.flow,
        short_side=a.short_side,
        max_frames=a.max_frames,
        max_failures=a.max_failures,
        num_videos=a.num_videos,
        seed=a.seed,
        num_workers=a.workers,
        videos_per_shard=a.videos_per_shard,
        retry_failed=a.retry_failed,
        gpus_per_worker=a.gpus_per_worker,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    try:
        summary = run_preprocess(cfg)
    except UsageError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    for video_id, reason in summary.failures:
        print(f"failed: {video_id}: {reason}")
    print(f"preprocess: {summary.line()}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
