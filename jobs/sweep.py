"""Ablation sweeps of the Spatiotemporal Multiplier Network on Ray Tune.

    python jobs/sweep.py --grid table2                   # embedded default: synthetic data, local
    python jobs/sweep.py --grid table3 --data OUT --split 1 --num-workers 8 \
        --gpus-per-worker 1 --max-concurrent 2 --asha
    python jobs/sweep.py --grid my_grid.yaml --data OUT  # any training or model flag
    python jobs/sweep.py --resume [--name SWEEP]         # a sweep whose driver died

One Tune trial per variant, each a Ray Train run of the fused stage. The report (the paper's
table with our error beside the published one, and a bar plot) is printed and logged to the
sweep's MLflow parent run; the best trial's model is registered (--model-name).
With --data every training flag defaults to the paper's value; without it, to the small run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, add_config_flags, build_config, fail, parser_for  # noqa: E402
from stm.config import SweepConfig, TrainConfig, embedded_default, field_names  # noqa: E402

PROG = "sweep.py"


def embedded_sweep_default() -> tuple[TrainConfig, SweepConfig]:
    """The sweep of ``python jobs/sweep.py --grid table2``: the embedded training run with one
    worker per trial, so that a trial (0.5 CPU driver + 0.5 CPU worker) leaves a core of a
    2-core machine to Ray Data."""
    train = embedded_default(num_workers=1, cpus_per_worker=0.5, epochs=4, lr_milestones=(3,))
    return train, SweepConfig(max_concurrent=1, trial_cpus=0.5)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, SweepConfig, bool]:
    """The trials' base config, the sweep's config and whether to resume."""
    parser = parser_for(PROG, __doc__)
    add_config_flags(parser, SweepConfig)
    add_config_flags(parser, TrainConfig, skip=("name",))  # --name is the sweep's
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep --name (default: the latest)"
    )
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    sweep_args = {k: args.pop(k) for k in field_names(SweepConfig) if k in args}
    if not resume and not sweep_args.get("grid"):
        fail(PROG, "--grid is required (table2, table3 or a YAML file), or --resume")
    if "only" in sweep_args:  # --only a,b c
        sweep_args["only"] = [n for item in sweep_args["only"] for n in item.split(",") if n]
    train, sweep = (TrainConfig(), SweepConfig()) if args.get("data") else embedded_sweep_default()
    return build_config(PROG, train, args), build_config(PROG, sweep, sweep_args), resume


def main(argv: list[str] | None = None) -> int:
    base, sweep, resume = parse(argv)
    from stm.train.grids import load_grid, trial_configs
    from stm.train.sweep import run_sweep

    if not resume:
        try:
            trial_configs(base, load_grid(sweep.grid, sweep.only))  # every variant, up front
        except UsageError as err:
            fail(PROG, str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = run_sweep(base, sweep, resume=resume)
    except UsageError as err:
        fail(PROG, str(err))
    print()
    print(summary.report)
    counts = {}
    for row in summary.rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    print(
        f"sweep {summary.name}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f" in {summary.seconds / 60:.1f} min"
    )
    if summary.best:
        registered = f", registered as {summary.registered}" if summary.registered else ""
        print(f"best: {summary.best}{registered}")
    print(f"report: {summary.sweep_dir}/report/ablation_report.md (and .png, .json)")
    print(
        f"MLflow parent run {summary.parent_run_id}; browse: "
        f"mlflow ui --backend-store-uri {summary.tracking_uri}"
    )
    return 0 if counts.get("failed", 0) < len(summary.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
