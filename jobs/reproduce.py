"""The paper's whole recipe in one resumable command: for each split the appearance and the
motion stream, the fused multiplier network from both, and the final test of every stage.

    python jobs/reproduce.py                             # embedded default: synthetic, local CPU
    python jobs/reproduce.py --data OUT --splits 1,2,3 --num-workers 8 --gpus-per-worker 1
    python jobs/reproduce.py --root UCF-101 --source ucf101 --split-files ucfTrainTestlist \
        --data OUT --num-workers 8 --gpus-per-worker 1   # preprocess the videos first

Killed at any point, the same command continues at the first unfinished stage (a finished one
is not rerun, an interrupted one resumes from its checkpoint). The report (each stream, their
late fusion and the fused network per split and as the mean over splits, beside the paper's
Tables 4 and 5) is printed and logged to the recipe's MLflow parent run; the fused model of the
best split becomes models:/stm@best-<dataset>. Every training flag applies to every stage over
the stage's recipe (stm.config.PAPER_RECIPES).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, add_config_flags, build_config, fail, parser_for  # noqa: E402
from stm.config import (  # noqa: E402
    ReproduceConfig,
    TrainConfig,
    embedded_default,
    field_names,
    stage_recipe,
)

PROG = "reproduce.py"
PER_STAGE = ("name", "stage", "split", "init", "appearance_init", "motion_init")  # set per stage


def _comma_lists(argv: list[str]) -> list[str]:
    """``--splits 1,2,3`` as ``--splits 1 2 3``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--splits" and "," in arg:
            out += [a for a in arg.split(",") if a]
        elif arg.startswith("--splits=") and "," in arg:
            out += ["--splits", *[a for a in arg.split("=", 1)[1].split(",") if a]]
        else:
            out.append(arg)
    return out


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, dict, ReproduceConfig]:
    """The training preset, the training flags given explicitly, and the recipe's config."""
    parser = parser_for(PROG, __doc__)
    add_config_flags(parser, ReproduceConfig)
    add_config_flags(parser, TrainConfig, skip=PER_STAGE)
    args = vars(parser.parse_args(_comma_lists(list(sys.argv[1:] if argv is None else argv))))
    recipe_args = {k: args.pop(k) for k in field_names(ReproduceConfig) if k in args}
    preset = TrainConfig() if args.get("data") else embedded_default()
    # a wrong training flag: one line, before anything starts (checked as the first stage's)
    real = bool(args.get("data"))
    build_config(
        PROG, preset, {**stage_recipe("appearance", real, args.get("num_workers", 1)), **args}
    )
    return preset, args, build_config(PROG, ReproduceConfig(), recipe_args)


def main(argv: list[str] | None = None) -> int:
    preset, flags, recipe = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from stm.train.reproduce import run_recipe

    try:
        summary = run_recipe(preset, flags, recipe)
    except UsageError as err:
        fail(PROG, str(err))
    print()
    print(summary.report)
    ran = ", ".join(summary.ran) or "none (all done)"
    print(f"recipe {summary.name}: stages run now: {ran}; {summary.seconds / 60:.1f} min")
    if summary.registered:
        print(f"best model: {summary.registered}")
    print(f"results: {summary.recipe_dir}")
    print(f"browse: mlflow ui --backend-store-uri {summary.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
