"""MLflow: one run per training, written by the driver (creation, the best checkpoint) and by
rank 0 of the worker group (per-epoch metrics, the confusion matrix). No global MLflow state:
every call names its tracking URI and run id, so it works the same in any Ray worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stm.locks import pid_alive

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
DRIVER_HOST = "driver_host"  # tags: the host and pid of the process that owns a run
DRIVER_PID = "driver_pid"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written (a one-line message)."""


def resolve_uri(uri: str = "") -> str:
    """The tracking URI: the flag, else $MLFLOW_TRACKING_URI, else the home's store
    (``sqlite:///<home>/mlflow.db``, :mod:`stm.home`); a relative SQLite path made absolute,
    because Ray workers and jobs run in other directories."""
    from stm import home

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or home.tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def mlflow_client(uri: str) -> Any:
    """An MLflow client of the tracking server or store ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0, create: bool = True) -> None:
    """Fail fast, in one line, when the tracking store cannot be used: a cluster's hours are
    not spent untracked. A local store's folder is made when it is the home's (``create``);
    without ``create`` (readers: predict, evaluate) a missing database is an error."""
    from stm import home

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        parent = db.parent
        if not create and not db.is_file():
            raise TrackingUnavailable(f"MLflow store {uri} does not exist (nothing trained yet?)")
        if create and parent == home.home():
            parent.mkdir(parents=True, exist_ok=True)
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingUnavailable(f"MLflow store {uri}: folder {parent} is not writable")
        if db.exists():
            _check_sqlite(uri, db)
        return
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable", said in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingUnavailable(
            f"MLflow tracking at {uri} is unreachable: {reason[:200]}"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_sqlite(uri: str, db: Path) -> None:
    """An existing SQLite store must be a database (not some other file)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as err:
        raise TrackingUnavailable(f"MLflow store {uri}: {db} is not usable ({err})") from None


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the MLflow 3 UI's view
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the MLflow UI


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created on first use; a local SQLite store gets its artifacts in
    ``mlartifacts/`` beside the database (absolute, so workers find it). The experiment is
    marked a model-training one, so that MLflow 3's UI opens it on its runs, not its GenAI view."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts to MLflow params (``model.fusion``), values as strings."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    parent_run_id: str = "",
    description: str = "",
) -> str:
    """Create a run with every config value as a param (and ``description`` as the run's
    description in the UI); returns its id."""
    from mlflow.entities import Param, RunTag

    client = mlflow_client(uri)
    all_tags = {**driver_tags(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if description:
        all_tags[DESCRIPTION_TAG] = description
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
    items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("mlflow.runName", run_name)])
    return run.info.run_id


def start_parent_run(
    uri: str,
    experiment: str,
    kind: str,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    description: str = "",
) -> str:
    """The parent run of a sweep or a recipe (``kind``): named ``name``, tagged
    ``kind=KIND`` and ``KIND=NAME`` (how the UI and ``search_runs`` find it); its trials or
    stages are its children (``start_run(..., parent_run_id=...)``)."""
    all_tags = {"kind": kind, kind: name, **tags}
    return start_run(uri, experiment, name, params, all_tags, description=description)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and np.isfinite(v)
    ]
    mlflow_client(uri).log_batch(run_id, metrics=items)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    client = mlflow_client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(mlflow_client(uri).get_run(run_id).data.tags)


def delete_tag(uri: str, run_id: str, key: str) -> None:
    """Remove a run's tag if it has it."""
    client = mlflow_client(uri)
    if key in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, key)


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str):
    """A confusion-matrix figure (rows: true class, columns: predicted), row-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    rows = confusion.sum(1, keepdims=True).clip(min=1)
    size = min(4 + 0.25 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    ticks = range(k)
    fontsize = max(3, min(9, 400 // max(k, 1)))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_class_table(confusions: Mapping[str, np.ndarray], class_names: list[str]) -> dict:
    """{"class": [...], "videos": [...], "<stream>_acc": [...]} for ``mlflow`` tables."""
    first = next(iter(confusions.values()))
    table: dict[str, list] = {"class": list(class_names), "videos": first.sum(1).tolist()}
    for name, c in confusions.items():
        rows = c.sum(1)
        table[f"{name}_acc"] = [
            float(c[i, i] / rows[i]) if rows[i] else None for i in range(len(rows))
        ]
    return table


def log_evaluation(
    uri: str, run_id: str, confusions: Mapping[str, np.ndarray], class_names: list[str]
) -> None:
    """The confusion-matrix image of the fused (or only) score and the per-class accuracy table."""
    import matplotlib.pyplot as plt

    client = mlflow_client(uri)
    name = "fused" if "fused" in confusions else next(iter(confusions))
    fig = confusion_figure(confusions[name], class_names, f"confusion ({name})")
    client.log_figure(run_id, fig, "confusion_matrix.png")
    plt.close(fig)
    table = per_class_table(confusions, class_names)
    client.log_text(run_id, json.dumps(table, indent=1), "per_class_accuracy.json")
    header = ",".join(table)
    lines = [header] + [",".join(str(table[c][i]) for c in table) for i in range(len(class_names))]
    client.log_text(run_id, "\n".join(lines) + "\n", "per_class_accuracy.csv")
    client.log_dict(run_id, {n: c.tolist() for n, c in confusions.items()}, "confusion.json")


def log_artifacts(uri: str, run_id: str, local_dir: str, artifact_path: str) -> None:
    mlflow_client(uri).log_artifacts(run_id, local_dir, artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED", reason: str = "") -> None:
    """End a run (``reason``, when given, as its ``error`` tag)."""
    client = mlflow_client(uri)
    if reason:
        client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, status=status)


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED; "" for a run the store does not hold."""
    try:
        return mlflow_client(uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - not found (the store's error type varies)
        return ""


def resume_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again, tagged with when it was resumed and by which driver."""
    client = mlflow_client(uri)
    client.update_run(run_id, status="RUNNING")
    tags = {"resumed": time.strftime("%Y-%m-%d %H:%M:%S"), **driver_tags()}
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def driver_tags() -> dict[str, str]:
    """Which process owns a run: a run still RUNNING whose driver is gone was killed."""
    return {DRIVER_HOST: socket.gethostname(), DRIVER_PID: str(os.getpid())}


def close_orphans(uri: str, experiment: str) -> list[str]:
    """Mark KILLED the runs of ``experiment`` still RUNNING whose driver was a process of
    this machine that no longer exists (a killed driver cannot end its own run); returns
    their ids. Runs of drivers on other machines are left alone."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get(DRIVER_PID, "")
        if tags.get(DRIVER_HOST) != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "error", f"its driver (pid {pid} on {host}) was killed")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) whose driver was killed KILLED: %s", len(closed), closed)
    return closed


def fail_run(uri: str, run_id: str, err: BaseException) -> None:
    """Mark a run FAILED (KILLED for an interrupt) with the reason as its ``error`` tag; never
    raises (it runs while another error propagates)."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
    reason = " ".join(str(err).split())[:500] or type(err).__name__
    try:
        client = mlflow_client(uri)
        client.set_tag(run_id, "error", f"{type(err).__name__}: {reason}")
        client.set_terminated(run_id, status=status)
    except Exception as tracking_err:  # noqa: BLE001 - the store itself may be the failure
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, tracking_err)
