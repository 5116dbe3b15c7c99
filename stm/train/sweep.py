"""Ablation sweeps on Ray Tune: the paper's Table 2 / Table 3 grids (or a YAML grid), one trial
per variant, each trial one Ray Train run of the fused stage; then the ablation report beside the
published numbers, and the best model into the MLflow registry.

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
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stm.config import (
    ModelConfig,
    SweepConfig,
    TrainConfig,
    UsageError,
    flat_fields,
    from_dict,
    to_dict,
    with_changes,
)
from stm.storage import absolute, join, read_text, write_text

log = logging.getLogger(__name__)

GRIDS = ("table2", "table3")
PAPER_RESULTS = Path(__file__).resolve().parents[1] / "paper_results.json"
SWEEP_FILE = "sweep.json"
LATEST_SWEEP = "LATEST_SWEEP"  # in the storage path: the newest sweep's name, for --resume
TUNE_DIR = "tune"
RUNS_DIR = "runs"
REPORT_DIR = "report"
# Flags a trial may not change: they belong to the sweep as a whole.
SWEEP_LEVEL = ("name", "storage_path", "mlflow_uri", "experiment")
PAPER_DATASETS = {"ucf101": "UCF101", "hmdb51": "HMDB51"}


# --- grids ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One trial of a sweep: a short name (trial, Train run and MLflow run name; a key of
    ``paper_results.json`` for the built-in grids) and the flags it changes (field names)."""

    name: str
    changes: dict[str, Any]


def _m2a(fusion: str, direction: str = "m2a") -> dict[str, Any]:
    # Table 2 has no temporal filters and no max pooling over time: its residual_mul m2a row
    # is Table 3's first row (8.72 / 37.23), whose "pool time" is unticked.
    return {"fusion": fusion, "direction": direction, "temporal": "none", "time_pool": "avg"}


def table2() -> list[Variant]:
    """Table 2 (Sect. 5.1): how the streams are connected; no temporal filters, average
    pooling over time; plus the unconnected two-stream baseline (late fusion only)."""
    rows = [
        ("direct_add-m2a", "direct_add", "m2a"),
        ("direct_mul-m2a", "direct_mul", "m2a"),
        ("residual_add-m2a", "residual_add", "m2a"),
        ("residual_mul-m2a", "residual_mul", "m2a"),
        ("residual_add-a2m", "residual_add", "a2m"),
        ("residual_mul-a2m", "residual_mul", "a2m"),
        ("residual_mul-bi", "residual_mul", "bi"),
        ("unconnected", "none", "m2a"),
    ]
    return [Variant(name, _m2a(fusion, direction)) for name, fusion, direction in rows]


def table3() -> list[Variant]:
    """Table 3 (Sect. 5.2): temporal filters in the residual_mul m2a network: placement,
    initialisation, and max pooling over time; plus the no-temporal baseline."""
    rows = [
        ("residual_last-avg", "residual_last", "avg", "avg"),
        ("skip_all-avg", "skip_all", "avg", "avg"),
        ("residual_all-avg", "residual_all", "avg", "avg"),
        ("skip_all-center", "skip_all", "center", "avg"),
        ("residual_last-center", "residual_last", "center", "avg"),
        ("residual_all-center", "residual_all", "center", "avg"),
        ("skip_all-center-maxpool", "skip_all", "center", "max"),
        ("residual_all-center-maxpool", "residual_all", "center", "max"),
    ]
    variants = [Variant("no_temporal", _m2a("residual_mul"))]
    for name, temporal, init, pool in rows:
        changes = {"fusion": "residual_mul", "direction": "m2a", "temporal": temporal}
        changes.update(temporal_init=init, time_pool=pool)
        variants.append(Variant(name, changes))
    return variants


BUILTIN = {"table2": table2, "table3": table3}


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: its name (``table2``, ``table3`` or the YAML file's stem), the
    variants, flags applied to every variant, and the report layout (a table name or "")."""

    name: str
    variants: tuple[Variant, ...]
    base: dict[str, Any] = field(default_factory=dict)
    layout: str = ""


def _coerce(where: str, key: str, value: Any, hint: Any) -> Any:
    """A YAML value as the flag's type, or a one-line ``UsageError`` like the CLI's."""
    flag = "--" + key.replace("_", "-")

    def bad(expected: str) -> UsageError:
        return UsageError(f"{where}: {flag}: expected {expected}, got {value!r}")

    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if typing.get_origin(hint) is tuple:
        items = value if isinstance(value, list) else [value]
        item_type = typing.get_args(hint)[0]
        return tuple(_coerce(where, key, v, item_type) for v in items)
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        raise bad("a string")
    value = str(value)
    choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    if choices and value not in choices:
        raise UsageError(
            f"{where}: {flag}: invalid choice {value!r} (choose from {', '.join(choices)})"
        )
    return value


def parse_changes(where: str, changes: Any) -> dict[str, Any]:
    """Validate a mapping of flag -> value (``bn-batch``, ``bn_batch`` or ``--bn-batch``)."""
    if changes is None:
        return {}
    if not isinstance(changes, dict):
        raise UsageError(f"{where}: expected a mapping of flag: value, got {changes!r}")
    hints = flat_fields(TrainConfig)
    out: dict[str, Any] = {}
    for raw, value in changes.items():
        key = str(raw).lstrip("-").replace("-", "_")
        if key not in hints:
            raise UsageError(f"{where}: unknown flag --{key.replace('_', '-')}")
        if key in SWEEP_LEVEL:
            raise UsageError(f"{where}: --{key.replace('_', '-')} is set for the whole sweep")
        out[key] = _coerce(where, key, value, hints[key])
    return out


def _safe_name(text: str) -> str:
    """A file-, Tune- and MLflow-safe variant name."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text).strip("_")[:120] or "variant"


def load_grid(spec: str, only: tuple[str, ...] = ()) -> Grid:
    """``table2``, ``table3`` or a YAML file; ``only`` keeps the named variants. One-line
    ``UsageError`` for anything wrong.

    A YAML grid (every key optional, at least one variant)::

        base: {epochs: 10}                 # flags for every variant
        variants:                          # named variants: name -> flags (or: table2 / table3)
          residual_mul-m2a: {fusion: residual_mul, direction: m2a}
          residual_add-m2a: {fusion: residual_add}
        grid: {lr: [0.001, 0.01]}          # a cartesian product, crossed with the variants
    """
    if spec in BUILTIN:
        grid = Grid(spec, tuple(BUILTIN[spec]()), layout=spec)
    else:
        grid = _load_yaml_grid(spec)
    if only:
        names = {v.name for v in grid.variants}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UsageError(
                f"--only {','.join(unknown)}: no such variant in {grid.name} "
                f"(valid: {', '.join(sorted(names))})"
            )
        grid = dataclasses.replace(grid, variants=tuple(v for v in grid.variants if v.name in only))
    return grid


def _load_yaml_grid(path: str) -> Grid:
    import yaml

    where = f"grid {path}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        hint = " (built-in grids: table2, table3)" if not path.endswith((".yaml", ".yml")) else ""
        raise UsageError(f"{where}: cannot read it: {err.strerror or err}{hint}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise UsageError(f"{where}: not valid YAML: {first[:200]}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping with variants: and/or grid:")
    unknown = sorted(set(doc) - {"base", "variants", "grid"})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (valid: base, variants, grid)")
    base = parse_changes(f"{where}: base", doc.get("base"))

    variants: list[Variant] = []
    layout = ""
    spec = doc.get("variants")
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise UsageError(f"{where}: variants: {spec!r} is not one of {', '.join(GRIDS)}")
        variants, layout = BUILTIN[spec](), spec
    elif isinstance(spec, dict):
        for name, changes in spec.items():
            safe = _safe_name(str(name))
            if safe != str(name):
                raise UsageError(
                    f"{where}: variant name {name!r}: use letters, digits and _ . = , + -"
                )
            variants.append(Variant(safe, parse_changes(f"{where}: variant {name}", changes)))
    elif spec is not None:
        raise UsageError(f"{where}: variants: expected a mapping or table2 / table3")

    product = doc.get("grid")
    if product is not None:
        if not isinstance(product, dict) or not product:
            raise UsageError(f"{where}: grid: expected a mapping of flag: [values]")
        axes = []
        for key, values in product.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise UsageError(f"{where}: grid: {key}: no values")
            checked = [parse_changes(f"{where}: grid", {key: v}) for v in values]
            axes.append(checked)
        combos = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)]
        names = [_safe_name(",".join(f"{k}={_short(v)}" for k, v in c.items())) for c in combos]
        if variants:
            variants = [
                Variant(f"{v.name}_{n}", {**v.changes, **c})
                for v in variants
                for n, c in zip(names, combos)
            ]
        else:
            variants = [Variant(n, c) for n, c in zip(names, combos)]
        layout = ""
    if not variants:
        raise UsageError(f"{where}: no variants (give variants: or grid:)")
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise UsageError(f"{where}: variant {v.name!r} appears twice")
        seen.add(v.name)
    return Grid(Path(path).stem, tuple(variants), base, layout)


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value) or "none"
    return str(value)


def trial_configs(base: TrainConfig, grid: Grid) -> dict[str, TrainConfig]:
    """Each variant's full training config: ``base`` with the grid's base flags, then the
    variant's; invalid combinations are a one-line ``UsageError`` naming the variant."""
    out = {}
    for v in grid.variants:
        try:
            cfg = with_changes(with_changes(base, grid.base), v.changes)
        except UsageError as err:
            raise UsageError(f"grid {grid.name}: variant {v.name}: {err}") from None
        out[v.name] = dataclasses.replace(cfg, name=v.name)
    return out


# --- the sweep ----------------------------------------------------------------------------------
@dataclass
class TrialRow:
    """One variant's outcome for the report."""

    variant: str
    status: str  # ok | failed | stopped (by ASHA) | not run
    reason: str = ""
    run_id: str = ""
    error: float | None = None  # 100 * (1 - score) of the latest evaluation, in %
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


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


def prepare(base: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The base config made absolute for trials (they run in other directories): synthetic
    data prepared when none is given, the data checked, num_classes from the data."""
    from stm.train.run import prepare_synthetic, validate_data

    if not base.data:
        base = prepare_synthetic(base)
    elif "://" not in base.data:
        base = dataclasses.replace(base, data=str(Path(base.data).resolve()))
    classes, _, _ = validate_data(base)
    if base.model.num_classes != len(classes):
        base = dataclasses.replace(
            base, model=dataclasses.replace(base.model, num_classes=len(classes))
        )
    return base, classes


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
    import ray

    from stm.train import tracking

    started = time.time()
    storage = absolute(base.storage_path)
    uri = tracking.resolve_uri(base.mlflow_uri)
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        raise UsageError(str(err)) from None

    if resume:
        name = sweep.name or (read_text(join(storage, LATEST_SWEEP)) or "").strip()
        state_text = read_text(join(storage, name, SWEEP_FILE)) if name else None
        if not state_text:
            raise UsageError(f"--resume: no sweep {sweep.name or '(latest)'} under {storage}")
        state = json.loads(state_text)
        sweep = dataclasses.replace(
            from_dict(SweepConfig, state["sweep"]), retry_failed=sweep.retry_failed
        )
        sweep_dir = join(storage, name)
        log.info("resuming sweep %s (%s)", name, sweep_dir)
    else:
        grid = load_grid(sweep.grid, sweep.only)
        base, _ = prepare(base)
        name = sweep.name or f"sweep-{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        sweep_dir = join(storage, name)
        if read_text(join(sweep_dir, SWEEP_FILE)):
            raise UsageError(f"sweep {name} exists under {storage}: pass --resume to continue it")
        runs = join(sweep_dir, RUNS_DIR)
        configs = trial_configs(dataclasses.replace(base, storage_path=runs, mlflow_uri=uri), grid)
        sweep = dataclasses.replace(sweep, name=name)
        parent = tracking.start_run(
            uri,
            base.experiment,
            name,
            {"sweep": to_dict(sweep), "base": to_dict(base)},
            {"kind": "sweep", "sweep": name, "grid": grid.name, "storage": sweep_dir},
        )
        state = {
            "name": name,
            "grid": {
                "name": grid.name,
                "layout": grid.layout,
                "base": grid.base,
                "variants": [dataclasses.asdict(v) for v in grid.variants],
            },
            "sweep": to_dict(sweep),
            "configs": {k: to_dict(c) for k, c in configs.items()},
            "parent_run_id": parent,
            "tracking_uri": uri,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_text(join(sweep_dir, SWEEP_FILE), json.dumps(state, indent=1))
        tracking.mlflow_client(uri).log_dict(parent, state["grid"], "grid.json")
    write_text(join(storage, LATEST_SWEEP), name)
    parent = state["parent_run_id"]
    uri = state["tracking_uri"]
    print(
        f"sweep {name}: {len(state['configs'])} trials; MLflow parent run {parent} ({uri})",
        flush=True,
    )

    if not ray.is_initialized():
        ray.init()
    results = _fit(state, sweep, sweep_dir, resume)
    rows = collect_rows(state, results, uri)
    close_dangling_runs(uri, rows)

    report_dir = tempfile.mkdtemp(prefix="stm-report-")
    report = write_report(state, rows, report_dir)
    client = tracking.mlflow_client(uri)
    client.log_artifacts(parent, report_dir)
    for f in sorted(os.listdir(report_dir)):
        _copy_out(os.path.join(report_dir, f), join(sweep_dir, REPORT_DIR, f))

    best = best_row(rows)
    registered = ""
    if best is not None:
        tags = client.get_run(parent).data.tags
        if tags.get("best_run_id") == best.run_id:  # a resumed sweep that had finished
            registered = tags.get("registered_model", "")
        client.set_tag(parent, "best_variant", best.variant)
        client.set_tag(parent, "best_run_id", best.run_id)
        if best.error is not None:
            client.log_metric(parent, "best_error", best.error)
        if sweep.model_name and not registered:
            registered = register_best(state, best, sweep.model_name, uri)
            client.set_tag(parent, "registered_model", registered)
    failed = sum(r.status == "failed" for r in rows)
    tracking.end_run(uri, parent, "FAILED" if failed == len(rows) else "FINISHED")
    return SweepSummary(
        name=name,
        grid=state["grid"]["name"],
        parent_run_id=parent,
        tracking_uri=uri,
        sweep_dir=sweep_dir,
        rows=rows,
        report=report,
        report_dir=report_dir,
        registered=registered,
        best=best.variant if best else "",
        seconds=time.time() - started,
    )


def _copy_out(local: str, dst: str) -> None:
    from stm.storage import resolve, write_bytes_atomic

    fs, path = resolve(dst)
    write_bytes_atomic(fs, path, Path(local).read_bytes())


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its variant name (stable across restores)."""
    return str(trial.config["variant"])


def _fit(state: dict, sweep: SweepConfig, sweep_dir: str, resume: bool) -> Any:
    """Tuner.fit() of a new sweep, or Tuner.restore(...).fit() of an interrupted one."""
    from ray import tune

    configs = state["configs"]
    gpus = max(c["gpus_per_worker"] for c in configs.values())
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
    scheduler = None
    if sweep.asha:
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(c["epochs"] for c in configs.values())
        # max_t beyond the last epoch: ASHA would otherwise stop every surviving trial at its
        # final report, before run_training logs the best checkpoint and closes the MLflow run.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=epochs + 1,
            grace_period=min(sweep.asha_grace, epochs),
            reduction_factor=2,
        )
    log.info("trial resources: driver %.2f CPU; workers: max %.2f GPU each", sweep.trial_cpus, gpus)
    tuner = tune.Tuner(
        trainable,
        # Small trial configs (Tune prints them): the trial reads its TrainConfig from sweep.json.
        param_space={"variant": tune.grid_search(list(configs)), "sweep_dir": sweep_dir},
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            scheduler=scheduler,
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


def sweep_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one Ray Train run of this trial's variant, resumed when Tune
    restores an interrupted sweep (the Train run name is the variant, stable per trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from stm.train import tracking
    from stm.train.run import run_training

    variant = config["variant"]
    state = json.loads(read_text(join(config["sweep_dir"], SWEEP_FILE)) or "{}")
    cfg = from_dict(TrainConfig, state["configs"][variant])
    run_id_file = join(cfg.storage_path, cfg.name, tracking.RUN_ID_FILE)
    resume = bool(read_text(run_id_file))
    tags = {
        "variant": variant,
        "model_variant": cfg.model.variant,
        "grid": state["grid"]["name"],
        "sweep": state["name"],
    }
    try:
        run_training(
            cfg,
            resume=resume,
            parent_run_id=state["parent_run_id"],
            tags=tags,
            callbacks=[TuneReportCallback()],
        )
    except Exception as err:
        reason = one_line(err)
        uri = tracking.resolve_uri(cfg.mlflow_uri)
        run_id = (read_text(run_id_file) or "").strip()
        if not run_id:  # failed before its MLflow run existed: record it as a failed child
            run_id = tracking.start_run(
                uri, cfg.experiment, variant, to_dict(cfg), tags, state["parent_run_id"]
            )
        tracking.set_tags(uri, run_id, {"error": reason[:5000]})
        tracking.end_run(uri, run_id, "FAILED")
        raise


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


def collect_rows(state: dict, results: Any, uri: str) -> list[TrialRow]:
    """Each variant's status (from Tune) and metrics (from its MLflow child run, which holds
    every epoch, also of a trial that was resumed)."""
    from stm.train import tracking

    client = tracking.mlflow_client(uri)
    outcome: dict[str, tuple[Any, dict]] = {}
    for result in results:
        variant = (result.config or {}).get("variant")
        if variant is not None:
            outcome[variant] = (result.error, dict(result.metrics or {}))
    rows = []
    for variant, cfg in state["configs"].items():
        row = TrialRow(variant=variant, status="not run")
        run_file = join(cfg["storage_path"], cfg["name"], tracking.RUN_ID_FILE)
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
        elif row.epoch >= cfg["epochs"] and (run is None or run.info.status == "FINISHED"):
            row.status = "ok"
        else:
            row.status = "stopped"
            row.reason = f"stopped early by ASHA after epoch {row.epoch} of {cfg['epochs']}"
        rows.append(row)
    return rows


def _failed_child(client: Any, state: dict, variant: str) -> str:
    runs = client.search_runs(
        [client.get_run(state["parent_run_id"]).info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{state['parent_run_id']}' and tags.variant = '{variant}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else ""


def close_dangling_runs(uri: str, rows: list[TrialRow]) -> None:
    """Child runs that Tune stopped (ASHA) were killed mid-run: mark them KILLED."""
    from stm.train import tracking

    client = tracking.mlflow_client(uri)
    for row in rows:
        stopped = row.run_id and row.status in ("stopped", "failed")
        if stopped and client.get_run(row.run_id).info.status == "RUNNING":
            status = "KILLED" if row.status == "stopped" else "FAILED"
            tracking.end_run(uri, row.run_id, status)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The finished trial with the highest score (ties: the earlier row)."""
    done = [r for r in rows if r.status == "ok" and "score" in r.metrics]
    return max(done, key=lambda r: r.metrics["score"]) if done else None


def register_best(state: dict, best: TrialRow, model_name: str, uri: str) -> str:
    """Register the best trial's best checkpoint as ``model_name``; returns "NAME/VERSION"."""
    from stm.train import registry, tracking

    cfg = state["configs"][best.variant]
    with tempfile.TemporaryDirectory(prefix="stm-best-") as tmp:
        path = tracking.download_checkpoint(uri, best.run_id, tmp)
        version = registry.register_checkpoint(
            uri,
            best.run_id,
            os.path.dirname(path),
            model_name,
            data=cfg["data"],
            tags={
                "variant": best.variant,
                "grid": state["grid"]["name"],
                "sweep": state["name"],
                "score": f"{best.metrics.get('score', math.nan):.4f}",
            },
        )
    return f"{model_name}/{version}"


# --- the report ---------------------------------------------------------------------------------
def paper_results() -> dict:
    """The published first-split errors (``stm/paper_results.json``, which names its source)."""
    return json.loads(PAPER_RESULTS.read_text())


def _model_key(model: dict) -> tuple:
    """What identifies a paper row: the connection and the temporal design."""
    fusion = model["fusion"]
    direction = model["direction"] if fusion != "none" else "-"
    temporal = model["temporal"]
    init = model["temporal_init"] if temporal != "none" else "-"
    return fusion, direction, temporal, init, model["time_pool"]


def paper_rows_by_model() -> dict[tuple, tuple[str, dict]]:
    """Model settings -> (table, paper row), for matching any variant to the paper."""
    paper = paper_results()["tables"]
    out: dict[tuple, tuple[str, dict]] = {}
    base = to_dict(ModelConfig())
    for table, make in BUILTIN.items():
        rows = {r["key"]: r for r in paper[table]["rows"]}
        for v in make():
            key = _model_key({**base, **v.changes})
            if v.name in rows and rows[v.name]["ucf101"] is not None:
                out.setdefault(key, (table, rows[v.name]))
    return out


def _fmt(value: float | None, uncertain: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + ("?" if uncertain else "")


def _dataset(state: dict) -> tuple[str, str]:
    """(source name, display name) of the data the sweep ran on."""
    from stm.data.shards import read_dataset_info

    data = next(iter(state["configs"].values()))["data"]
    try:
        source = str(read_dataset_info(data).get("source", "data"))
    except (FileNotFoundError, OSError, ValueError):
        source = "data"
    return source, PAPER_DATASETS.get(source, source)


def _ours(row: TrialRow) -> str:
    if row.status == "failed":
        return "failed"
    if row.status == "not run":
        return "not run"
    text = _fmt(row.error)
    return text + " (stopped)" if row.status == "stopped" else text


def report_table(state: dict, rows: list[TrialRow]) -> str:
    """The ablation report in Markdown: the paper's rows and layout, our error beside the
    paper's for the same dataset."""
    paper = paper_results()
    layout = state["grid"]["layout"]
    source, shown = _dataset(state)
    split = next(iter(state["configs"].values()))["split"]
    ours_header = f"ours: {shown} split {split}"
    by_key = paper_rows_by_model()

    if layout in BUILTIN:
        table = paper["tables"][layout]
        paper_rows = {r["key"]: r for r in table["rows"]}
        if layout == "table2":
            head = ["connection", "fusion", "direction", "Fig."]
            cells = ("connection", "fusion", "direction", "figure")
        else:
            head = ["case", "temporal init.", "pool time"]
            cells = ("case", "init", "pool_time")
        title = table["caption"]
    else:
        head, cells, paper_rows = ["variant", "changes", "paper row"], (), {}
        title = f"Grid {state['grid']['name']}: classification error (%)."

    columns = ["UCF101 (paper)", "HMDB51 (paper)"]
    if source == "ucf101":
        columns.insert(1, ours_header)
    else:
        columns.append(ours_header)
    header = head + columns + ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    uncertain_seen = False
    variants = {v["name"]: v for v in state["grid"]["variants"]}
    for row in rows:
        cfg = state["configs"][row.variant]
        prow = paper_rows.get(row.variant)
        if layout in BUILTIN:
            left = [str(prow[c]) if prow else row.variant for c in cells]
        else:
            matched = by_key.get(_model_key(cfg["model"]))
            changes = variants.get(row.variant, {}).get("changes", {})
            left = [
                row.variant,
                ", ".join(f"{k}={_short(v)}" for k, v in changes.items()) or "—",
                f"{matched[0]}: {matched[1]['key']}" if matched else "—",
            ]
            prow = matched[1] if matched else None
        unc = bool(prow and prow.get("uncertain"))
        uncertain_seen |= unc
        values = {
            "UCF101 (paper)": _fmt(prow["ucf101"] if prow else None, unc),
            "HMDB51 (paper)": _fmt(prow["hmdb51"] if prow else None, unc),
            ours_header: _ours(row),
        }
        notes = row.reason if row.status != "ok" else ""
        if prow and prow.get("note"):
            notes = "; ".join(n for n in (notes, "paper: " + prow["note"]) if n)
        lines.append(
            "| "
            + " | ".join(left + [values[c] for c in columns] + [notes.replace("|", "/")])
            + " |"
        )

    first = next(iter(state["configs"].values()))
    model = first["model"]
    foot = [
        "",
        f"**{title}**",
        "",
        f"Ours: 100 − fused video accuracy (%) of the latest evaluation on the test list of split "
        f"{split} of {shown} (`{first['data']}`), {first['epochs']} "
        f"epoch{'s' if first['epochs'] != 1 else ''}, "
        f"{model['appearance_arch']} + {model['motion_arch']} streams, "
        f"{first['test_frames']} test frames ({first['test_mode']}). "
        f"Paper: ResNet-50 appearance + ResNet-152 motion, ImageNet-initialised streams, "
        f"first split.",
    ]
    if uncertain_seen:
        foot.append("")
        foot.append("`?`: " + paper["note_uncertain"])
    foot.append("")
    foot.append(f"Source of the paper's numbers: {paper['source']}")
    return "\n".join(lines + foot) + "\n"


def report_plot(state: dict, rows: list[TrialRow], path: str) -> None:
    """Grouped horizontal bars per variant: our error and the paper's (both datasets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    paper = paper_results()
    layout = state["grid"]["layout"]
    by_key = paper_rows_by_model()
    paper_rows = {r["key"]: r for r in paper["tables"][layout]["rows"]} if layout in BUILTIN else {}
    _, shown = _dataset(state)
    names = [r.variant for r in rows]
    ours = [r.error if r.error is not None else np.nan for r in rows]
    ucf, hmdb, uncertain = [], [], []
    for r in rows:
        prow = paper_rows.get(r.variant)
        if prow is None:
            m = by_key.get(_model_key(state["configs"][r.variant]["model"]))
            prow = m[1] if m else None
        uncertain.append(bool(prow and prow.get("uncertain")))
        ucf.append(prow["ucf101"] if prow and prow["ucf101"] is not None else np.nan)
        hmdb.append(prow["hmdb51"] if prow and prow["hmdb51"] is not None else np.nan)
    y = np.arange(len(names))
    h = 0.27
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.55 * len(names)))
    ax.barh(y - h, ours, h, label=f"ours ({shown})", color="tab:blue")
    paper_bars = [
        ax.barh(y, ucf, h, label="paper UCF101", color="tab:orange"),
        ax.barh(y + h, hmdb, h, label="paper HMDB51", color="tab:green"),
    ]
    for bars in paper_bars:
        for patch, unsure in zip(bars.patches, uncertain):
            if unsure:  # a placement the text extraction does not confirm
                patch.set_hatch("//")
                patch.set_alpha(0.6)
    for i, r in enumerate(rows):
        if r.status in ("failed", "not run"):
            ax.text(0.5, i - h, r.status, va="center", fontsize=8, color="tab:red")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("error (%), lower is better")
    ax.set_title(f"{state['grid']['name']}: sweep {state['name']}", fontsize=9)
    handles = [
        Patch(color="tab:blue", label=f"ours ({shown})"),
        Patch(color="tab:orange", label="paper UCF101"),
        Patch(color="tab:green", label="paper HMDB51"),
    ]
    if any(uncertain):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="uncertain"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(state: dict, rows: list[TrialRow], out_dir: str) -> str:
    """ablation_report.md / .png / .json in ``out_dir``; returns the Markdown."""
    text = report_table(state, rows)
    Path(out_dir, "ablation_report.md").write_text(text)
    report_plot(state, rows, str(Path(out_dir, "ablation_report.png")))
    data = {
        "sweep": state["name"],
        "grid": state["grid"]["name"],
        "parent_run_id": state["parent_run_id"],
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    Path(out_dir, "ablation_report.json").write_text(json.dumps(data, indent=1))
    return text
