"""The training driver: the data (the embedded synthetic dataset when none is given), the
MLflow run and its bookkeeping, Ray Train's TorchTrainer with failure handling, and the run's
end: its best checkpoint logged as its model and registered (``stm.train.registry``).

``run_training`` is four steps: ``prepare_data`` (shared with sweeps), ``open_run`` (a new run,
or the one to resume), ``fit`` and ``finish``. Results go to the home (``stm.home``) unless
``--storage-path`` / ``--mlflow-uri`` say otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm import home
from stm.config import TrainConfig, UsageError, from_dict, to_dict, with_changes
from stm.data.shards import list_parquet, read_classes, read_dataset_info
from stm.storage import absolute, join, read_text, resolve, write_text
from stm.train import tracking
from stm.train.checkpoint import fetch_run, fetch_uri, load_checkpoint
from stm.train.ingest import build_datasets, data_config, split_sizes
from stm.train.loop import SCORE, train_loop_per_worker

log = logging.getLogger(__name__)

SYNTHETIC_FLOW = "dis"  # DIS keeps the laptop demo in minutes; real data defaults to TV-L1
CONFIG_FILE = "config.json"  # in a run's folder: its config, as it started (what --resume reads)
CHECKPOINT_SNAPSHOT = (
    "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
)
# flags a resume may change: where the run is and how it runs, not what it trains
RESUME_MAY_CHANGE = frozenset(
    {
        "name",
        "storage_path",
        "mlflow_uri",
        "experiment",
        "max_failures",
        "num_workers",
        "gpus_per_worker",
        "cpus_per_worker",
        "keep_checkpoints",
        "imagenet_dir",
    }
)


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


@dataclass(frozen=True)
class PreparedData:
    """A run's data, checked: the config with its data path absolute and ``num_classes`` from
    the data, the class names, the split's sizes and the dataset's settings (dataset.json)."""

    cfg: TrainConfig
    classes: list[str]
    num_train: int
    num_test: int
    dataset: dict[str, Any]


def prepare_synthetic(cfg: TrainConfig) -> TrainConfig:
    """Generate and preprocess the synthetic dataset when no data is given (kept for reruns,
    in the home)."""
    from stm.config import PreprocessConfig
    from stm.data.preprocess import run_preprocess

    out = home.synthetic_data()
    if not (out / "classes.json").is_file() or not list(out.glob("shards/*.parquet")):
        log.info("preparing the synthetic dataset in %s (first run only)", out)
        run_preprocess(
            PreprocessConfig(
                source="synthetic",
                root=str(out.parent / "synthetic-videos"),
                out=str(out),
                flow=SYNTHETIC_FLOW,
            )
        )
    return dataclasses.replace(cfg, data=str(out))


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """The run's data: the synthetic dataset when none is given, a local path made absolute
    (trials and workers run in other directories), checked (``validate_data``)."""
    if not cfg.data:
        init_ray()
        cfg = prepare_synthetic(cfg)
    elif "://" not in cfg.data:
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    classes, num_train, num_test = validate_data(cfg)
    if cfg.model.num_classes != len(classes):
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, num_classes=len(classes))
        )
    try:
        dataset = read_dataset_info(cfg.data)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(
            f"--data {cfg.data}: dataset.json: {_one_line(err)} (how the data was preprocessed: "
            f"rerun jobs/preprocess.py --out {cfg.data} with its options)"
        ) from None
    return PreparedData(cfg, classes, num_train, num_test, dataset)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


def _read_line(uri: str) -> str | None:
    text = read_text(uri)
    return text.strip() if text is not None else None


def validate_data(cfg: TrainConfig) -> tuple[list[str], int, int]:
    """Class names and split sizes; one-line usage errors for data that cannot train."""
    fs, root = resolve(cfg.data)
    try:
        shards = list_parquet(fs, f"{root.rstrip('/')}/shards")
    except (FileNotFoundError, OSError):
        shards = []
    if not shards:
        raise UsageError(f"--data {cfg.data}: no shards (run jobs/preprocess.py --out {cfg.data})")
    repair = f"rerun jobs/preprocess.py --out {cfg.data} with its options"
    try:
        classes = read_classes(cfg.data)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("not a list of class names")
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(f"--data {cfg.data}: classes.json: {_one_line(err)} ({repair})") from None
    try:
        num_train, num_test = split_sizes(cfg.data, cfg.split)
    except (OSError, ValueError) as err:  # pyarrow's errors for unreadable shards
        raise UsageError(
            f"--data {cfg.data}: the shards cannot be read: {_one_line(err)}"
        ) from None
    if num_train == 0 or num_test == 0:
        raise UsageError(
            f"--split {cfg.split}: the data has {num_train} training and {num_test} test videos"
        )
    if num_train // cfg.num_workers < cfg.bn_batch:
        raise UsageError(
            f"{num_train} training videos are too few for {cfg.num_workers} workers with "
            f"--bn-batch {cfg.bn_batch}"
        )
    return classes, num_train, num_test


def check_gpus(cfg: TrainConfig) -> None:
    """GPUs the cluster cannot give: one line on a single machine (it would wait forever), a
    warning on a cluster whose autoscaler may still add GPU nodes."""
    import ray

    need = cfg.num_workers * cfg.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0.0)
    if need <= have:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("Resources", {}).get("CPU", 0) > 0:
        raise UsageError(
            f"--num-workers {cfg.num_workers} x --gpus-per-worker {cfg.gpus_per_worker:g} need "
            f"{need:g} GPUs; this machine's Ray has {have:g}"
        )
    log.warning(
        "waiting for %g GPUs: the cluster has %g now (an autoscaler may add nodes)", need, have
    )


def warn_if_not_shared(cfg: TrainConfig, uri: str) -> None:
    """On a multi-node cluster, local paths must be on a filesystem every node shares."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = []
    storage = storage_root(cfg)
    if "://" not in storage:
        local.append(f"--storage-path {storage}")
    if uri.startswith("sqlite:"):
        local.append(f"MLflow store {uri}")
    if local:
        log.warning(
            "%d nodes, but %s %s local: use s3:// or gs:// (and an MLflow server), or a shared "
            "filesystem mounted at the same path on every node",
            len(nodes),
            " and ".join(local),
            "is" if len(local) == 1 else "are",
        )


def initial_state(cfg: TrainConfig, uri: str) -> tuple[dict[str, Any] | None, str]:
    """The run's starting weights and where they come from (the ``init`` tag), by
    ``cfg.resolved_init`` (Sect. 4.1: each stream from ImageNet, the fused model from both):

    - streams: the stream runs' checkpoints (``--appearance-init`` / ``--motion-init``: MLflow
      run ids or checkpoint paths); the fused stage needs both;
    - imagenet: torchvision's ImageNet files (``--imagenet-dir`` or torch's cache), for the
      streams the stage trains; missing files are a usage error;
    - scratch: nothing.
    """
    how = cfg.resolved_init
    if how == "scratch":
        return None, "scratch"
    if how == "imagenet":
        return _imagenet_state(cfg), "ImageNet"
    cfg.check_stream_inits()
    refs = {"appearance": cfg.appearance_init, "motion": cfg.motion_init}
    state: dict[str, Any] = {}
    for stream, ref in refs.items():
        if ref:
            prefixes = (f"{stream}.", f"temporal.{stream}.")
            ckpt = _load_init(
                f"--{stream}-init", ref, _checkpoint_path(f"--{stream}-init", ref, uri)
            )
            state.update({k: v for k, v in ckpt["model"].items() if k.startswith(prefixes)})
    return state, ", ".join(f"{s} from {r}" for s, r in refs.items() if r)


def _load_init(flag: str, ref: str, path: str) -> dict[str, Any]:
    """A stream run's checkpoint (weights only); anything else is a one-line error."""
    try:
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("it holds no model weights")
    except Exception as err:  # noqa: BLE001 - not a checkpoint: torch's many error types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"{flag} {ref}: not an stm checkpoint ({reason})") from None
    return state


def _checkpoint_path(flag: str, ref: str, uri: str) -> str:
    """A local checkpoint for ``ref``: a local path, a file or folder in cloud storage, or the
    best checkpoint of an MLflow run (downloads cached under the home)."""
    if Path(ref).exists():
        return ref
    try:
        if "://" in ref:
            return str(fetch_uri(ref, home.model_cache()))
        return str(fetch_run(uri, ref, home.model_cache()))
    except UsageError as err:
        raise UsageError(f"{flag} {ref}: {err}") from None
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split())[:200]
        raise UsageError(f"{flag} {ref}: no such file or MLflow run in {uri} ({reason})") from None


def _imagenet_state(cfg: TrainConfig) -> dict[str, Any]:
    from stm.model import build_model
    from stm.model.imagenet import load_stream
    from stm.train.steps import streams_of

    model = build_model(cfg.model)
    archs = {"appearance": cfg.model.appearance_arch, "motion": cfg.model.motion_arch}
    try:
        for stream in streams_of(cfg.stage):
            load_stream(model.stream(stream), archs[stream], cfg.imagenet_dir or None)
    except FileNotFoundError as err:
        raise UsageError(f"--init imagenet: {err}; or choose --init scratch") from None
    keep = tuple(f"{s}." for s in streams_of(cfg.stage))
    return {k: v for k, v in model.state_dict().items() if k.startswith(keep)}


def describe(cfg: TrainConfig, num_train: int, num_test: int, init: str) -> str:
    """What a run trains on what, for its description in the MLflow UI."""
    m = cfg.model
    streams = f"{m.appearance_arch} appearance + {m.motion_arch} motion"
    if cfg.stage != "fused":
        streams = f"{m.appearance_arch if cfg.stage == 'appearance' else m.motion_arch} {cfg.stage}"
    return (
        f"stm {cfg.stage} stage: {streams}, {m.variant}; data {cfg.data or 'synthetic'} split "
        f"{cfg.split} ({num_train} training, {num_test} test videos); init {init}; "
        f"{cfg.epochs} epochs of {cfg.batch_size} videos per update on {cfg.num_workers} workers"
    )


def init_ray() -> None:
    """A local instance (with the dashboard: Train's placement-group cleaner and the State API
    use it), or the cluster of ``ray job submit`` / ``RAY_ADDRESS`` / ``ray start``."""
    import ray

    if not ray.is_initialized():
        ray.init()


def check_storage(storage: str) -> None:
    """Fail in one line, before anything is computed, when the storage path cannot hold runs
    (a file, no permission, an unreachable or forbidden bucket)."""
    from pyarrow import fs as pafs

    try:
        filesystem, root = resolve(storage)
        filesystem.create_dir(root, recursive=True)
        kind = filesystem.get_file_info(root).type
        if "://" not in storage and kind != pafs.FileType.Directory:  # object stores: no dirs
            raise NotADirectoryError(f"{root} is not a folder")
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UsageError(f"--storage-path {storage}: {reason}") from None


def storage_root(cfg: TrainConfig) -> str:
    """Where runs and checkpoints go: ``--storage-path``, else the home's ``runs/``."""
    return absolute(cfg.storage_path or home.runs_dir())


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
    tracking.close_orphans(uri, cfg.experiment)  # runs whose drivers were killed
    if resume:  # the run's own config, from its folder; a contradicting flag is an error
        cfg = resumed_config(cfg, uri, explicit)
    data = prepare_data(cfg)
    init_ray()
    check_gpus(data.cfg)
    warn_if_not_shared(data.cfg, uri)
    # a resumed run starts from its latest checkpoint; one killed before its first checkpoint
    # starts again from the same initial weights
    init, source = initial_state(data.cfg, uri)
    cfg, run_id = open_run(data, uri, resume, source, parent_run_id, tags)
    try:
        result = fit(cfg, data, uri, run_id, init, callbacks)
        best, registered = finish(cfg, uri, run_id, result)
    except BaseException as err:
        tracking.fail_run(uri, run_id, err)
        raise
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


def open_run(
    data: PreparedData,
    uri: str,
    resume: bool,
    source: str,
    parent_run_id: str = "",
    tags: dict[str, str] | None = None,
) -> tuple[TrainConfig, str]:
    """The run's config (with its name) and MLflow run id: the run to resume (``cfg.name``,
    else the latest under the storage path), or a new run with every config value and the
    dataset's settings as params."""
    cfg, storage = data.cfg, storage_root(data.cfg)
    if resume:  # resumed_config found the run and its checkpoint
        run_id = _read_line(join(storage, cfg.name, tracking.RUN_ID_FILE)) or ""
        tracking.resume_run(uri, run_id)
    else:
        name = cfg.name or f"{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        old_run = _read_line(join(storage, name, tracking.RUN_ID_FILE))
        if old_run and has_checkpoint(join(storage, name)):
            raise UsageError(f"run {name} exists under {storage}: pass --resume to continue it")
        if old_run:  # it died before its first checkpoint: nothing to resume, start it again
            tracking.end_run(uri, old_run, "FAILED", reason="ended before its first checkpoint")
        cfg = dataclasses.replace(cfg, name=name)
        run_tags = {
            "stage": cfg.stage,
            "variant": cfg.model.variant,
            "storage": join(storage, name),
            "init": source,
            **(tags or {}),
        }
        run_id = tracking.start_run(
            uri,
            cfg.experiment,
            name,
            {**to_dict(cfg), "dataset": data.dataset},
            run_tags,
            parent_run_id=parent_run_id,
            description=describe(cfg, data.num_train, data.num_test, source),
        )
        write_text(join(storage, name, CONFIG_FILE), json.dumps(to_dict(cfg), indent=1))
        write_text(join(storage, name, tracking.RUN_ID_FILE), run_id)
    log.info("MLflow run %s in %s (%s)", run_id, uri, join(storage, cfg.name))
    return cfg, run_id


def has_checkpoint(run_dir: str) -> bool:
    """Whether Ray Train has recorded a checkpoint of the run (its manager's snapshot)."""
    text = read_text(join(run_dir, CHECKPOINT_SNAPSHOT))
    return bool(text and "checkpoint_" in text)


def latest_checkpointed_run(storage: str) -> str:
    """The run under ``storage`` that wrote a checkpoint last ("" when none did)."""
    from pyarrow import fs as pafs

    filesystem, root = resolve(storage)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return ""
    newest = ("", -1)
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        snapshot = filesystem.get_file_info(f"{entry.path}/{CHECKPOINT_SNAPSHOT}")
        name = entry.path.rstrip("/").rsplit("/", 1)[-1]
        if snapshot.type == pafs.FileType.File and has_checkpoint(join(storage, name)):
            mtime = snapshot.mtime_ns or 0
            if mtime > newest[1]:
                newest = (name, mtime)
    return newest[0]


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    values = to_dict(cfg)
    model = values.pop("model")
    flat = {**values, **model}
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in flat.items()}


def resumed_config(
    cfg: TrainConfig, uri: str, explicit: dict[str, Any] | None = None
) -> TrainConfig:
    """The config of the run to resume (``cfg.name``, else the run that wrote a checkpoint
    last), as the run saved it, with the flags that may change on a resume applied. One-line
    ``UsageError``: no such run, no checkpoint yet (nothing to resume), a finished run, or a
    flag that contradicts the run's config."""
    storage = storage_root(cfg)
    name = cfg.name or latest_checkpointed_run(storage)
    if not name:
        raise UsageError(f"--resume: no run under {storage} has written a checkpoint")
    run_dir = join(storage, name)
    run_id = _read_line(join(run_dir, tracking.RUN_ID_FILE))
    if not run_id:
        raise UsageError(f"--resume: no run {name} under {storage}")
    if not has_checkpoint(run_dir):
        raise UsageError(
            f"--resume: run {name} ended before its first checkpoint: nothing to resume "
            "(start it again without --resume)"
        )
    text = read_text(join(run_dir, CONFIG_FILE))
    if text:
        saved = from_dict(TrainConfig, json.loads(text))
    else:  # a run from before config.json: its newest checkpoint says
        saved = from_dict(TrainConfig, load_checkpoint(_newest_checkpoint(run_dir))["config"])
    given = dict(explicit or {})
    if given.get("data") and "://" not in given["data"]:
        given["data"] = str(Path(given["data"]).resolve())
    theirs = _flat(saved)
    clash = [
        k
        for k, v in given.items()
        if k not in RESUME_MAY_CHANGE
        and k in theirs
        and theirs[k] != (list(v) if isinstance(v, tuple | list) else v)
    ]
    if clash:
        said = ", ".join(
            f"--{k.replace('_', '-')} {given[k]} (the run: {theirs[k]})" for k in clash
        )
        raise UsageError(f"--resume: run {name} was started with other values: {said}")
    if tracking.run_status(uri, run_id) == "FINISHED":
        raise UsageError(f"--resume: run {name} finished; nothing to resume")
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    return with_changes(saved, {**changes, "name": name, "storage_path": cfg.storage_path})


def _newest_checkpoint(run_dir: str) -> str:
    from pyarrow import fs as pafs

    filesystem, root = resolve(run_dir)
    names = sorted(
        e.path
        for e in filesystem.get_file_info(pafs.FileSelector(root))
        if e.type == pafs.FileType.Directory
        and e.path.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")
    )
    local = names[-1]
    if "://" in run_dir:
        return str(fetch_uri(join(run_dir, local.rsplit("/", 1)[-1]), home.model_cache()))
    return local


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


def finish(cfg: TrainConfig, uri: str, run_id: str, result: Any) -> tuple[str, str]:
    """The run's end: its best checkpoint logged as its model, registered as a version of
    ``--model-name`` (unless ""), the run marked FINISHED. Returns the best checkpoint's
    path and "NAME version N (alias ALIAS)" (or "")."""
    from stm.train import registry

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
