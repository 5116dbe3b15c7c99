"""Videos to training shards (decode, optical flow, JPEG, Parquet) on Ray Data.

    python jobs/preprocess.py --source ucf101 --root VIDEOS --splits SPLITDIR --out OUT
    python jobs/preprocess.py --source hmdb51 --root VIDEOS --splits SPLITDIR --out OUT
    python jobs/preprocess.py --source folder --root VIDEOS --out OUT      # VIDEOS/<class>/<video>
    python jobs/preprocess.py --source synthetic --out OUT [--num-videos N] [--seed S]

OUT may be a URI (s3://bucket/prefix); one that cannot be reached is one line before any work.
Rerun the same command after an interruption: finished videos are kept, the rest is done; videos
that failed are redone only with --retry-failed, except those that failed for a reason not about
the video (status retry: a lost task, a full disk, out of memory, a network error), which a plain
rerun processes again. --verify first checks every stored JPEG against its checksum and processes
the videos that fail again. One run per OUT at a time: a run holds OUT/_preprocess.lock (host,
pid, heartbeat) and a second one stops with one line naming the holder; a dead run's lock is
taken over.
Exit status: 0 when at most --max-failures of the videos failed, 1 otherwise, 2 for a usage error.

Output: OUT/shards/*.parquet (one row per video: RGB JPEGs, flow u/v JPEGs, their crc32s, label,
splits), OUT/manifest/*.parquet (one row per input video: ok | failed | retry, with the reason),
OUT/classes.json, OUT/dataset.json. The folder source has one split: a video is in the test set
when a hash of its group (the id without a UCF-style "_cNN" clip suffix) falls in the bottom 20%.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, fail, parse_config  # noqa: E402
from stm.config import PreprocessConfig  # noqa: E402

PROG = "preprocess.py"


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    """The config from the command line (one line and exit 2 when it is wrong)."""
    return parse_config(PROG, __doc__, PreprocessConfig, argv, required=("out",))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from stm.data.preprocess import run_preprocess

    try:
        summary = run_preprocess(cfg)
    except UsageError as err:
        fail(PROG, str(err))
    for video_id, reason in summary.failures:
        print(f"failed: {video_id}: {reason}")
    print(f"preprocess: {summary.line()}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
