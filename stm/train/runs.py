"""A training run's record: its folder under the storage path (``config.json``, the MLflow
run id, Ray Train's checkpoints) and its MLflow run, for a new run and for a resume.

Layout of a run ``NAME`` under the storage path (``--storage-path``, else ``<home>/runs``)::

    NAME/config.json                       the config the run started with (--resume reads it)
    NAME/mlflow_run_id                     its MLflow run
    NAME/checkpoint_*/checkpoint.pt        Ray Train's checkpoints (the best --keep-checkpoints)
    NAME/checkpoint_manager_snapshot.json  Ray Train's record of them
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stm import home
from stm.config import TrainConfig, UsageError, from_dict, to_dict, with_changes
from stm.storage import absolute, join, read_text, resolve, write_text
from stm.train import tracking
from stm.train.checkpoint import fetch_uri, load_checkpoint

if TYPE_CHECKING:
    from stm.train.prepare import PreparedData

log = logging.getLogger(__name__)

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
        "max_bad_videos",
        "num_workers",
        "gpus_per_worker",
        "cpus_per_worker",
        "keep_checkpoints",
        "imagenet_dir",
    }
)


def _read_line(uri: str) -> str | None:
    text = read_text(uri)
    return text.strip() if text is not None else None


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


def remove_unrecorded_checkpoints(run_dir: str) -> list[str]:
    """Delete the run's ``checkpoint_*`` folders that Ray Train's snapshot does not list: an
    upload that failed (a full disk) leaves a half-written ``checkpoint.pt`` there, which
    nothing reads but which holds the space. Returns the deleted paths; never raises."""
    from pyarrow import fs as pafs

    try:
        filesystem, root = resolve(run_dir)
        snapshot = read_text(join(run_dir, CHECKPOINT_SNAPSHOT)) or ""
        entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        removed = []
        for e in entries:
            name = e.path.rstrip("/").rsplit("/", 1)[-1]
            dead = name.startswith("checkpoint_") and name not in snapshot
            if e.type == pafs.FileType.Directory and dead:
                filesystem.delete_dir(e.path)
                removed.append(e.path)
        if removed:
            log.warning("removed %d unfinished checkpoint folders: %s", len(removed), removed)
        return removed
    except OSError as err:
        log.warning("could not clean %s: %s", run_dir, err)
        return []


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
