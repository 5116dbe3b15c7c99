"""Ablation sweeps of the Spatiotemporal Multiplier Network on Ray Tune.

    python jobs/sweep.py --grid table2                   # embedded default: synthetic data, local
    python jobs/sweep.py --grid table3 --data OUT --split 1 --workers-per-trial 8 \
        --gpus-per-worker 1 --max-concurrent 2 --asha
    python jobs/sweep.py --grid my_grid.yaml --data OUT  # any training or model flag
    python jobs/sweep.py --resume [--name SWEEP]         # a sweep whose driver died

One Tune trial per variant, each a Ray Train run of the fused stage. The report (the paper's
table with our error beside the published one, and a bar plot) is printed and logged to the
sweep's MLflow parent run; the best trial's model is registered (--model-name).
With --data every training flag defaults to the paper's value; without it, to the small run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import OneLineParser, UsageError, add_config_flags, apply_flags, fail  # noqa: E402
from stm.config import TrainConfig, embedded_default  # noqa: E402

SWEEP_FLAGS = (
    "grid",
    "only",
    "max_concurrent",
    "trial_cpus",
    "asha",
    "asha_grace",
    "name",
    "model_name",
    "retry_failed",
)


def embedded_sweep_default() -> tuple[TrainConfig, dict]:
    """The sweep of ``python jobs/sweep.py --grid table2``: the embedded training run with one
    worker per trial, so that a trial (0.5 CPU driver + 0.5 CPU worker) leaves a core of a
    2-core machine to Ray Data."""
    return embedded_default(num_workers=1, cpus_per_worker=0.5, epochs=4, lr_milestones=(3,)), {
        "max_concurrent": 1,
        "trial_cpus": 0.5,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--grid", help="table2 | table3 | a YAML grid file (see stm/train/sweep.py load_grid)"
    )
    parser.add_argument(
        "--only", nargs="+", default=argparse.SUPPRESS, help="run only these variants"
    )
    parser.add_argument(
        "--workers-per-trial",
        type=int,
        dest="num_workers",
        default=argparse.SUPPRESS,
        help="Ray Train workers of each trial (same as --num-workers)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=argparse.SUPPRESS,
        help="trials at a time (default: as many as the resources allow; 1 without --data)",
    )
    parser.add_argument(
        "--trial-cpus",
        type=float,
        default=argparse.SUPPRESS,
        help="CPUs of each trial's driver on top of its workers (default 1; 0.5 without --data)",
    )
    parser.add_argument(
        "--asha",
        action="store_true",
        default=argparse.SUPPRESS,
        help="stop poor trials early (ASHA on the fused test accuracy)",
    )
    parser.add_argument(
        "--asha-grace",
        type=int,
        default=argparse.SUPPRESS,
        help="epochs before ASHA may stop a trial (default 1)",
    )
    parser.add_argument(
        "--name",
        default=argparse.SUPPRESS,
        help="the sweep's name (default sweep-GRID-TIME); with --resume: which",
    )
    parser.add_argument(
        "--model-name",
        default=argparse.SUPPRESS,
        help="registry name of the best model (default stm; '' = none)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep --name (default: the latest)"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with --resume: run failed trials again",
    )
    add_config_flags(parser, TrainConfig, skip=("name",))
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    sweep_args = {k: args.pop(k) for k in SWEEP_FLAGS if k in args}
    if not resume and not sweep_args.get("grid"):
        fail(parser.prog, "--grid is required (table2, table3 or a YAML file), or --resume")

    from stm.train.sweep import SweepConfig, load_grid, run_sweep, trial_configs

    try:
        if args.get("data"):
            preset, sweep_preset = TrainConfig(), {}
        else:
            preset, sweep_preset = embedded_sweep_default()
        base = apply_flags(preset, args)
        if "only" in sweep_args:
            sweep_args["only"] = tuple(
                n for item in sweep_args["only"] for n in item.split(",") if n
            )
        sweep = SweepConfig(**{**sweep_preset, **sweep_args})
        if not resume:
            trial_configs(base, load_grid(sweep.grid, sweep.only))  # every variant, up front
    except UsageError as err:
        fail(parser.prog, str(err))
    except ValueError as err:
        fail(parser.prog, str(err).splitlines()[0])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = run_sweep(base, sweep, resume=resume)
    except UsageError as err:
        fail(parser.prog, str(err))
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
