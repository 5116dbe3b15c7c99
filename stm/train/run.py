"""The training driver: ``run_training`` is four steps, ``prepare_data`` (the data, checked;
the embedded synthetic dataset when none is given; :mod:`stm.train.prepare`, shared with sweeps
and the recipe), ``open_run`` (a new run, or the one to resume; :mod:`stm.train.runs`), ``fit``
(Ray Train's TorchTrainer with failure handling) and ``finish`` (the best checkpoint logged as
the run's model and registered, :mod:`stm.train.registry`). Results go to the home
(:mod:`stm.home`) unless ``--storage-path`` / ``--mlflow-uri`` say otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from stm.config import TrainConfig, UsageError, to_dict
from stm.storage import join, resolve
from stm.train import tracking
from stm.train.ingest import build_datasets, data_config, train_inputs
from stm.train.loop import SCORE, STOPPED, train_loop_per_worker
from stm.train.prepare import (
    PreparedData,
    check_gpus,
    init_ray,
    initial_state,
    prepare_data,
    warn_if_not_shared,
)
from stm.train.runs import (
    check_storage,
    open_run,
    remove_unrecorded_checkpoints,
    resumed_config,
    storage_root,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    name: str
    run_id: str
    tracking_uri: str
    storage: str
    metrics: dict[str, float]
    best_checkpoint: str
    seconds: float
    registered: str = ""  # "NAME version N (alias ALIAS)", "" when not registered


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    parent_run_id: str = "",
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    explicit: dict[str, Any] | None = None,
) -> RunSummary:
    """Train (or resume) one run and return its summary; usage errors raise ``UsageError``.

    Args:
        cfg: the run; with ``resume`` only its name, storage path and tracking URI are used
            (the run's config comes from its folder).
        resume: continue the run ``cfg.name`` (default: the run under the storage path that
            wrote a checkpoint last).
        parent_run_id: an MLflow parent run (a sweep) for this run.
        tags: extra MLflow tags (e.g. the sweep's variant name).
        callbacks: Ray Train ``RunConfig`` callbacks, e.g. Tune's report callback when this
            run is one trial of a sweep.
        explicit: with ``resume``, the flags the user gave (flat names): each must agree with
            the run's config, except those in ``RESUME_MAY_CHANGE``.
    """
    started = time.time()
    cfg = cfg.resolved()  # the effective values, in the MLflow params and the checkpoints
    uri = tracking.resolve_uri(cfg.mlflow_uri)
    try:  # before anything is computed: a cluster's hours are not spent untracked
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        raise UsageError(str(err)) from None
    check_storage(storage_root(cfg))
    if resume:  # the run's own config, from its folder; a contradicting flag is an error
        cfg = resumed_config(cfg, uri, explicit)
    data = prepare_data(cfg)
    init_ray()
    check_gpus(data.cfg)
    warn_if_not_shared(data.cfg, uri)
    # a resumed run starts from its latest checkpoint; one killed before its first checkpoint
    # starts again from the same initial weights
    init, source = initial_state(data.cfg, uri)
    tracking.close_orphans(uri, cfg.experiment)  # runs whose drivers were killed
    cfg, run_id = open_run(data, uri, resume, source, parent_run_id, tags)
    run_dir = join(storage_root(cfg), cfg.name)
    tracking.delete_tag(uri, run_id, STOPPED)  # a resumed run's earlier stop is mended
    try:
        result = fit(cfg, data, uri, run_id, init, callbacks)
        best, registered = finish(cfg, uri, run_id, result)
    except BaseException as err:
        err = failure(cfg, run_dir, err)
        tracking.fail_run(uri, run_id, err)
        remove_unrecorded_checkpoints(run_dir)  # what a failed upload left half-written
        raise err from None
    return RunSummary(
        name=cfg.name,
        run_id=run_id,
        tracking_uri=uri,
        storage=join(storage_root(cfg), cfg.name),
        metrics=dict(result.metrics or {}),
        best_checkpoint=best,
        seconds=time.time() - started,
        registered=registered,
    )


def fit(
    cfg: TrainConfig,
    data: PreparedData,
    uri: str,
    run_id: str,
    init: dict[str, Any] | None,
    callbacks: list | None = None,
) -> Any:
    """Ray Train's fit of the run: one worker per ``--num-workers``, checkpoints ranked by
    score, worker-group restarts from the latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop_config = {
        "cfg": to_dict(cfg),
        "num_train": data.num_train,
        "num_test": data.num_test,
        "run_dir": join(storage_root(cfg), cfg.name),  # where the checkpoints go
        "train_inputs": train_inputs(cfg),  # the shard files and training ids, listed once
        "class_names": data.classes,
        "dataset": data.dataset,
        "tracking_uri": uri,
        "run_id": run_id,
        "init": ray.put(init) if init is not None else None,
    }
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.name,
            **_ray_storage(storage_root(cfg)),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=build_datasets(cfg),
        dataset_config=data_config(),
    )
    return trainer.fit()


def _ray_storage(storage: str) -> dict[str, Any]:
    """Ray Train's storage arguments: a URI as its pyarrow filesystem and path (so that a
    query string such as ``?region=`` configures the filesystem instead of ending the path)."""
    if "://" not in storage:
        return {"storage_path": storage}
    filesystem, path = resolve(storage)
    return {"storage_path": path, "storage_filesystem": filesystem}


class TrainingFailed(RuntimeError):
    """A run that Ray Train gave up on (after ``--max-failures`` restarts): one line, exit 1."""


def failure(cfg: TrainConfig, run_dir: str, err: BaseException) -> BaseException:
    """Ray Train's error as one line: the first worker's exception, what was kept and how to
    continue. Other errors are returned as they are."""
    from ray.train import TrainingFailedError

    if not isinstance(err, TrainingFailedError):
        return err
    causes = getattr(err, "worker_failures", None) or {}
    cause = next(iter(causes.values()), None) or getattr(err, "controller_failure", None) or err
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
    return TrainingFailed(
        f"run {cfg.name} failed after {max(cfg.max_failures, 0)} restarts: {text[:300]}; its "
        f"checkpoints are kept in {run_dir}: continue with --resume --name {cfg.name}"
    )


def check_stopped(uri: str, run_id: str) -> None:
    """A run that stopped itself (``stm.train.loop.stop_reason``: too many bad videos, or no
    room for a checkpoint) fails with the line the loop left in its ``stopped`` tag. Its
    checkpoints are kept: ``--resume`` continues it once the cause is mended."""
    reason = tracking.run_tags(uri, run_id).get(STOPPED)
    if reason:
        raise UsageError(reason)


def finish(cfg: TrainConfig, uri: str, run_id: str, result: Any) -> tuple[str, str]:
    """The run's end: its best checkpoint logged as its model, registered as a version of
    ``--model-name`` (unless ""), the run marked FINISHED. Returns the best checkpoint's
    path and "NAME version N (alias ALIAS)" (or "")."""
    from stm.train import registry

    check_stopped(uri, run_id)
    best, registered = "", ""
    if result.best_checkpoints:
        checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(SCORE, -1.0))
        best = checkpoint.path
        with checkpoint.as_directory() as d:
            registry.log_model(uri, run_id, d)
        if cfg.model_name:
            version, alias = registry.register_run(
                uri,
                run_id,
                cfg.model_name,
                score=float(metrics.get(SCORE, 0.0)),
                data=cfg.data,
                split=cfg.split,
            )
            registered = f"{cfg.model_name} version {version} (alias {alias})"
            tracking.set_tags(uri, run_id, {"registered_model": f"{cfg.model_name}/{version}"})
    tracking.end_run(uri, run_id)
    return best, registered
