"""Ablation sweeps on Ray Tune: one trial per variant of a grid (:mod:`stm.train.grids`), each
trial one Ray Train run of the fused stage; then the ablation report beside the published
numbers (:mod:`stm.train.report`), and the best model into the MLflow registry.

Ray 2.60 runs Train V2, where ``Tuner(TorchTrainer(...))`` no longer works: the trainable is a
plain Tune function (:func:`sweep_trial`) that builds and fits a ``TorchTrainer`` through
:func:`stm.train.run.run_training`, with Train's ``TuneReportCallback`` forwarding every epoch's
metrics to Tune (for ASHA and the progress table). The trial's own driver process takes
``trial_cpus`` on top of its Train workers.

Layout of a sweep ``S`` under the storage path::

    S/sweep.json          the grid, each trial's config, the parent MLflow run (what --resume reads)
    S/tune/               Tune's experiment (Tuner.restore resumes a sweep whose driver died)
    S/runs/<variant>/     each trial's Ray Train run (its name is the variant: unique in S, and
                          stable, so a restored trial resumes its own Train run)
    S/report/             ablation_report.md / .png / .json (also logged to the parent run)

MLflow: one parent run per sweep, one child run per trial (tags ``variant``, ``grid``, ``sweep``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm.config import SweepConfig, TrainConfig, UsageError, from_dict, to_dict
from stm.storage import join, read_text, resolve, write_bytes_atomic, write_text
from stm.train import tracking
from stm.train.grids import Grid, load_grid, trial_configs
from stm.train.prepare import prepare_data
from stm.train.report import TrialRow, write_report
from stm.train.runs import has_checkpoint, storage_root

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
LATEST_SWEEP = "LATEST_SWEEP"  # in the storage path: the newest sweep's name, for --resume
TUNE_DIR = "tune"
RUNS_DIR = "runs"
REPORT_DIR = "report"


@dataclass(frozen=True)
class SweepState:
    """A sweep as its first run fixed it, kept in ``S/sweep.json``: ``--resume`` and every
    trial read it back, so a resumed sweep runs the same grid and configs into the same MLflow
    parent run, whatever flags the resuming command has."""

    name: str
    grid: Grid
    sweep: SweepConfig
    configs: Mapping[str, TrainConfig]  # variant -> its full training config, in grid order
    parent_run_id: str
    tracking_uri: str
    created: str  # local time the sweep started

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "grid": self.grid.to_dict(),
                "sweep": to_dict(self.sweep),
                "configs": {k: to_dict(c) for k, c in self.configs.items()},
                "parent_run_id": self.parent_run_id,
                "tracking_uri": self.tracking_uri,
                "created": self.created,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> SweepState:
        data = json.loads(text)
        return cls(
            name=data["name"],
            grid=Grid.from_dict(data["grid"]),
            # "model_name" moved to the trials' TrainConfig (every finished run registers)
            sweep=from_dict(
                SweepConfig, {k: v for k, v in data["sweep"].items() if k != "model_name"}
            ),
            configs={k: from_dict(TrainConfig, c) for k, c in data["configs"].items()},
            parent_run_id=data["parent_run_id"],
            tracking_uri=data["tracking_uri"],
            created=data["created"],
        )

    def save(self, sweep_dir: str) -> None:
        write_text(join(sweep_dir, SWEEP_FILE), self.to_json())

    @classmethod
    def load(cls, sweep_dir: str) -> SweepState | None:
        """The state in ``sweep_dir``, or None when it has none."""
        text = read_text(join(sweep_dir, SWEEP_FILE))
        return cls.from_json(text) if text else None


@dataclass(frozen=True)
class TrialParams:
    """A trial's Tune config: small, because Tune prints it; the rest is in ``sweep.json``."""

    variant: str
    sweep_dir: str


@dataclass(frozen=True)
class SweepSummary:
    name: str
    grid: str
    parent_run_id: str
    tracking_uri: str
    sweep_dir: str
    rows: list[TrialRow]
    report: str  # the Markdown table
    report_dir: str  # local copies of the report files
    registered: str  # "NAME/VERSION" of the best model, "" if none
    best: str  # the best variant
    seconds: float


def run_sweep(base: TrainConfig, sweep: SweepConfig, *, resume: bool = False) -> SweepSummary:
    """Run (or resume) a sweep and write its report; usage errors raise ``UsageError``.

    Args:
        base: the training flags every trial starts from (``storage_path``, ``mlflow_uri`` and
            ``experiment`` are the sweep's).
        sweep: the grid and how to run it.
        resume: continue the sweep ``sweep.name`` (default: the latest under the storage path):
            finished trials are kept, unfinished ones resume their Train runs from their last
            checkpoints; the grid and configs come from the first run's ``sweep.json``.
    """
    started = time.time()
    storage = storage_root(base)
    uri = tracking.resolve_uri(base.mlflow_uri)
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        raise UsageError(str(err)) from None
    state = resume_sweep(storage, sweep) if resume else start_sweep(base, sweep, storage, uri)
    sweep_dir = join(storage, state.name)
    write_text(join(storage, LATEST_SWEEP), state.name)
    print(
        f"sweep {state.name}: {len(state.configs)} trials; "
        f"MLflow parent run {state.parent_run_id} ({state.tracking_uri})",
        flush=True,
    )
    rows = collect_rows(state, _fit(state, sweep_dir, resume))
    close_dangling_runs(state.tracking_uri, rows)
    report, report_dir = publish_report(state, rows, sweep_dir)
    best = best_row(rows)
    registered = record_best(state, best) if best is not None else ""
    failed = sum(r.status == "failed" for r in rows)
    status = "FAILED" if failed == len(rows) else "FINISHED"
    tracking.end_run(state.tracking_uri, state.parent_run_id, status)
    return SweepSummary(
        name=state.name,
        grid=state.grid.name,
        parent_run_id=state.parent_run_id,
        tracking_uri=state.tracking_uri,
        sweep_dir=sweep_dir,
        rows=rows,
        report=report,
        report_dir=report_dir,
        registered=registered,
        best=best.variant if best else "",
        seconds=time.time() - started,
    )


def start_sweep(base: TrainConfig, sweep: SweepConfig, storage: str, uri: str) -> SweepState:
    """A new sweep: its grid's trial configs, its MLflow parent run and its ``sweep.json``."""
    grid = load_grid(sweep.grid, sweep.only)
    base = prepare_data(base).cfg  # absolute, checked, num_classes from the data
    name = sweep.name or f"sweep-{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    sweep_dir = join(storage, name)
    if read_text(join(sweep_dir, SWEEP_FILE)):
        raise UsageError(f"sweep {name} exists under {storage}: pass --resume to continue it")
    runs = join(sweep_dir, RUNS_DIR)
    configs = trial_configs(dataclasses.replace(base, storage_path=runs, mlflow_uri=uri), grid)
    sweep = dataclasses.replace(sweep, name=name)
    parent = tracking.start_parent_run(
        uri,
        base.experiment,
        "sweep",
        name,
        {"sweep": to_dict(sweep), "base": to_dict(base)},
        {"grid": grid.name, "storage": sweep_dir},
    )
    state = SweepState(
        name=name,
        grid=grid,
        sweep=sweep,
        configs=configs,
        parent_run_id=parent,
        tracking_uri=uri,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    state.save(sweep_dir)
    tracking.mlflow_client(uri).log_dict(parent, grid.to_dict(), "grid.json")
    return state


def resume_sweep(storage: str, sweep: SweepConfig) -> SweepState:
    """The sweep ``sweep.name`` (default: the latest) as its first run saved it; of this
    command's sweep flags only ``retry_failed`` applies."""
    name = sweep.name or (read_text(join(storage, LATEST_SWEEP)) or "").strip()
    state = SweepState.load(join(storage, name)) if name else None
    if state is None:
        raise UsageError(f"--resume: no sweep {sweep.name or '(latest)'} under {storage}")
    log.info("resuming sweep %s (%s)", name, join(storage, name))
    retry = dataclasses.replace(state.sweep, retry_failed=sweep.retry_failed)
    return dataclasses.replace(state, sweep=retry)


def _copy_out(local: str, dst: str) -> None:
    fs, path = resolve(dst)
    write_bytes_atomic(fs, path, Path(local).read_bytes())


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its variant name (stable across restores)."""
    return str(trial.config["variant"])


def _fit(state: SweepState, sweep_dir: str, resume: bool) -> Any:
    """Tuner.fit() of a new sweep, or Tuner.restore(...).fit() of an interrupted one."""
    import ray
    from ray import tune

    if not ray.is_initialized():
        ray.init()
    sweep = state.sweep
    trainable = tune.with_resources(sweep_trial, {"CPU": sweep.trial_cpus, "GPU": 0})
    tune_path = join(sweep_dir, TUNE_DIR)
    if resume and tune.Tuner.can_restore(tune_path):
        tuner = tune.Tuner.restore(
            tune_path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=sweep.retry_failed,
        )
        return tuner.fit()
    gpus = max(c.gpus_per_worker for c in state.configs.values())
    log.info("trial resources: driver %.2f CPU; workers: max %.2f GPU each", sweep.trial_cpus, gpus)
    tuner = tune.Tuner(
        trainable,
        # Small trial configs (Tune prints them): the trial reads its TrainConfig from sweep.json.
        param_space={"variant": tune.grid_search(list(state.configs)), "sweep_dir": sweep_dir},
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            scheduler=_asha(state),
            max_concurrent_trials=sweep.max_concurrent or None,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=sweep_dir,
            failure_config=tune.FailureConfig(max_failures=0),  # Train restarts its workers
        ),
    )
    return tuner.fit()


def _asha(state: SweepState) -> Any:
    """The ASHA scheduler of ``--asha``, else None."""
    if not state.sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = max(c.epochs for c in state.configs.values())
    # max_t beyond the last epoch: ASHA would otherwise stop every surviving trial at its
    # final report, before run_training logs the best checkpoint and closes the MLflow run.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs + 1,
        grace_period=min(state.sweep.asha_grace, epochs),
        reduction_factor=2,
    )


def sweep_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one Ray Train run of this trial's variant, resumed when Tune
    restores an interrupted sweep (the Train run name is the variant, stable per trial)."""
    params = from_dict(TrialParams, config)
    state = SweepState.load(params.sweep_dir)
    if state is None:
        raise FileNotFoundError(f"no {SWEEP_FILE} in {params.sweep_dir}")
    from ray.tune.integration.ray_train import TuneReportCallback

    from stm.train.run import run_training

    variant = params.variant
    cfg = state.configs[variant]
    run_id_file = join(cfg.storage_path, cfg.name, tracking.RUN_ID_FILE)
    tags = {
        "variant": variant,
        "model_variant": cfg.model.variant,
        "grid": state.grid.name,
        "sweep": state.name,
    }
    try:
        run_training(
            cfg,
            resume=bool(read_text(run_id_file))
            and has_checkpoint(join(cfg.storage_path, cfg.name)),
            parent_run_id=state.parent_run_id,
            tags=tags,
            callbacks=[TuneReportCallback()],
        )
    except Exception as err:
        _record_failure(state, cfg, tags, run_id_file, one_line(err))
        raise


def _record_failure(
    state: SweepState, cfg: TrainConfig, tags: dict[str, str], run_id_file: str, reason: str
) -> None:
    """Mark the trial's MLflow child run FAILED with the reason (tag ``error``); a trial that
    failed before its run existed gets one, so that every variant has a child run."""
    uri = tracking.resolve_uri(cfg.mlflow_uri)
    run_id = (read_text(run_id_file) or "").strip()
    if not run_id:
        run_id = tracking.start_run(
            uri, cfg.experiment, tags["variant"], to_dict(cfg), tags, state.parent_run_id
        )
    tracking.set_tags(uri, run_id, {"error": reason[:5000]})
    tracking.end_run(uri, run_id, "FAILED")


def one_line(err: BaseException | str) -> str:
    """The last meaningful line of an exception (Ray wraps them in tracebacks)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else "unknown error"
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", ln):
            return ln[:300]
    return lines[-1][:300]


def collect_rows(state: SweepState, results: Iterable[Any]) -> list[TrialRow]:
    """Each variant's status (from Tune) and metrics (from its MLflow child run, which holds
    every epoch, also of a trial that was resumed)."""
    client = tracking.mlflow_client(state.tracking_uri)
    outcome: dict[str, tuple[Any, dict]] = {}
    for result in results:
        variant = (result.config or {}).get("variant")
        if variant is not None:
            outcome[variant] = (result.error, dict(result.metrics or {}))
    rows = []
    for variant, cfg in state.configs.items():
        row = TrialRow(variant=variant, status="not run")
        run_file = join(cfg.storage_path, cfg.name, tracking.RUN_ID_FILE)
        row.run_id = (read_text(run_file) or "").strip() or _failed_child(client, state, variant)
        run = client.get_run(row.run_id) if row.run_id else None
        if run is not None:
            row.metrics = dict(run.data.metrics)
        elif variant in outcome:
            row.metrics = {
                k: float(v) for k, v in outcome[variant][1].items() if isinstance(v, int | float)
            }
        error, _ = outcome.get(variant, (None, {}))
        row.epoch = int(row.metrics.get("epoch", 0))
        score = row.metrics.get("score")
        if score is not None and row.metrics.get("test_videos"):
            row.error = 100.0 * (1.0 - score)
        if error is not None:
            tag = run.data.tags.get("error", "") if run is not None else ""
            row.status, row.reason = "failed", tag or one_line(error)
        elif variant not in outcome:
            row.status = "not run"
        elif row.epoch >= cfg.epochs and (run is None or run.info.status == "FINISHED"):
            row.status = "ok"
        else:
            row.status = "stopped"
            row.reason = f"stopped early by ASHA after epoch {row.epoch} of {cfg.epochs}"
        rows.append(row)
    return rows


def _failed_child(client: Any, state: SweepState, variant: str) -> str:
    parent = state.parent_run_id
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.variant = '{variant}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else ""


def close_dangling_runs(uri: str, rows: list[TrialRow]) -> None:
    """Child runs that Tune stopped (ASHA) were killed mid-run: mark them KILLED."""
    client = tracking.mlflow_client(uri)
    for row in rows:
        stopped = row.run_id and row.status in ("stopped", "failed")
        if stopped and client.get_run(row.run_id).info.status == "RUNNING":
            status = "KILLED" if row.status == "stopped" else "FAILED"
            tracking.end_run(uri, row.run_id, status)


def publish_report(state: SweepState, rows: list[TrialRow], sweep_dir: str) -> tuple[str, str]:
    """The report written to a local folder, logged to the parent run and copied to
    ``S/report/``; returns (the Markdown, the local folder)."""
    report_dir = tempfile.mkdtemp(prefix="stm-report-")
    report = write_report(
        state.grid,
        state.configs,
        rows,
        report_dir,
        sweep=state.name,
        parent_run_id=state.parent_run_id,
    )
    tracking.mlflow_client(state.tracking_uri).log_artifacts(state.parent_run_id, report_dir)
    for f in sorted(os.listdir(report_dir)):
        _copy_out(os.path.join(report_dir, f), join(sweep_dir, REPORT_DIR, f))
    return report, report_dir


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The finished trial with the highest score (ties: the earlier row)."""
    done = [r for r in rows if r.status == "ok" and "score" in r.metrics]
    return max(done, key=lambda r: r.metrics["score"]) if done else None


def record_best(state: SweepState, best: TrialRow) -> str:
    """Tag the parent run with the best trial and with the model version that trial's run
    registered (every finished trial registers its own, ``stm.train.run.finish``); returns
    "NAME/VERSION" or "" (registration off, or a trial from before it)."""
    uri, parent = state.tracking_uri, state.parent_run_id
    client = tracking.mlflow_client(uri)
    client.set_tag(parent, "best_variant", best.variant)
    client.set_tag(parent, "best_run_id", best.run_id)
    if best.error is not None:
        client.log_metric(parent, "best_error", best.error)
    registered = client.get_run(best.run_id).data.tags.get("registered_model", "")
    if registered:
        client.set_tag(parent, "registered_model", registered)
    return registered
