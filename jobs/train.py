"""Train the Spatiotemporal Multiplier Network on Ray Train.

    python jobs/train.py                    # embedded default: synthetic videos, local CPU
    python jobs/train.py --data OUT --split 1 --stage fused --num-workers 8 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/ucf101 ...

With --data every flag defaults to the paper's value for the --stage (shown below: the fused
stage's; --stage appearance or motion selects that stream's recipe, stm.config.PAPER_RECIPES);
without it, to the small embedded run (stm.config.embedded_default). A flag given explicitly
overrides the recipe.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, add_config_flags, build_config, fail, parser_for  # noqa: E402
from stm.config import TrainConfig, embedded_default, stage_recipe  # noqa: E402

PROG = "train.py"


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, bool, dict]:
    """The run's config from the command line, whether to resume, and the flags given (a
    resume takes the run's own config; the flags given must agree with it)."""
    parser = parser_for(PROG, __doc__)
    add_config_flags(parser, TrainConfig)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run --name (default: the latest)"
    )
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    real = bool(args.get("data"))
    preset = TrainConfig() if real else embedded_default()
    if resume:  # where the run is; its config comes from its folder
        where = {k: args[k] for k in ("name", "storage_path", "mlflow_uri") if k in args}
        return build_config(PROG, embedded_default(), where), True, args
    recipe = stage_recipe(args.get("stage", preset.stage), real, args.get("num_workers", 1))
    return build_config(PROG, preset, {**recipe, **args}), False, args


def main(argv: list[str] | None = None) -> int:
    cfg, resume, given = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from stm.train.run import TrainingFailed, run_training

    try:
        summary = run_training(cfg, resume=resume, explicit=given if resume else None)
    except UsageError as err:
        fail(PROG, str(err))
    except TrainingFailed as err:
        fail(PROG, str(err), status=1)
    m = summary.metrics
    accs = "  ".join(
        f"{name} {m[f'test_video_acc_{name}']:.1%}"
        for name in ("appearance", "motion", "fused")
        if f"test_video_acc_{name}" in m
    )
    videos, epoch = m.get("test_videos", 0), m.get("epoch", 0)
    print(f"test video accuracy: {accs}  ({videos:.0f} videos, epoch {epoch:.0f})")
    print(f"run {summary.name} ({summary.run_id}) in {summary.seconds:.0f} s")
    print(f"best checkpoint: {summary.best_checkpoint}")
    if summary.registered:
        print(f"registered: {summary.registered}")
    print(f"MLflow store: {summary.tracking_uri}")
    print(f"browse: mlflow ui --backend-store-uri {summary.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
