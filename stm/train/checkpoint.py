"""Checkpoints: the file, what it holds, loading it back and rebuilding the network.

A checkpoint is one ``checkpoint.pt`` written by rank 0 at the end of every epoch and read with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only: loading it
runs no code). It describes itself: the training config, the class names and the dataset's
preprocessing settings travel with the weights, so a checkpoint alone rebuilds the network and
prepares a new video the way the training data was prepared.

In MLflow every finished training run holds its best checkpoint once, inside its pyfunc model
(``model/artifacts/checkpoint/``, :mod:`stm.train.registry`); runs made before that hold it in
``best_checkpoint/``. ``fetch`` finds either and keeps one cached copy per run under the home
(:func:`stm.home.model_cache`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from stm.config import JPEG_QUALITY_BEFORE, TrainConfig, UsageError, from_dict, to_dict

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"  # the config, readable without torch
CLASSES_FILE = "classes.json"  # the class names (index = label)
DATASET_FILE = "dataset.json"  # the training data's preprocessing settings
MODEL_ARTIFACT = "model"  # a run's pyfunc model (its checkpoint inside)
MODEL_CHECKPOINT = "model/artifacts/checkpoint"  # the checkpoint folder inside it
LEGACY_CHECKPOINT = "best_checkpoint"  # where runs before the pyfunc model kept it
COMPLETE = ".complete"  # a cached download that finished


def checkpoint_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    cfg: TrainConfig,
    metrics: dict[str, float],
    class_names: list[str] | None = None,
    dataset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A self-describing checkpoint: it alone rebuilds the model (config, class names) and
    says how its data was preprocessed (``dataset``: the dataset's ``dataset.json``)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": to_dict(cfg),
        "metrics": dict(metrics),
        "class_names": list(class_names or []),
        "dataset": dict(dataset or {}),
    }


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the ``checkpoint.pt`` in that folder."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file (or a folder holding ``checkpoint.pt``), tensors on the CPU."""
    return torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild the trained network from a checkpoint alone."""
    from stm.model import build_model

    state = load_checkpoint(path)
    cfg = from_dict(TrainConfig, state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model, cfg


def write_model_folder(checkpoint: str | Path, dst: str | Path) -> Path:
    """The folder a model carries: the checkpoint file itself (moved or copied once) and its
    config, class names and dataset settings as JSON, readable without torch."""
    src = checkpoint_file(checkpoint)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst / CHECKPOINT_FILE)
    state = torch.load(src, map_location="cpu", weights_only=True)
    (dst / CONFIG_FILE).write_text(json.dumps(state["config"], indent=1))
    (dst / CLASSES_FILE).write_text(json.dumps(list(state.get("class_names") or []), indent=1))
    (dst / DATASET_FILE).write_text(json.dumps(dict(state.get("dataset") or {}), indent=1))
    return dst


def preprocessing(state: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """How the model's training data was preprocessed (flow, short_side, jpeg_quality): from
    the checkpoint, else a ``dataset.json`` beside it; {} when neither says."""
    info = dict(state.get("dataset") or {})
    if not info and folder is not None and (folder / DATASET_FILE).is_file():
        info = json.loads((folder / DATASET_FILE).read_text())
    if "flow" not in info or "short_side" not in info:
        return {}
    # datasets written before their JPEG quality was recorded used JPEG_QUALITY_BEFORE
    return {
        "flow": info["flow"],
        "short_side": info["short_side"],
        "jpeg_quality": int(info.get("jpeg_quality") or JPEG_QUALITY_BEFORE),
        "max_long_side": info.get("max_long_side"),  # None: before it was recorded (the default)
    }


def _cached(dst: Path, download) -> Path:
    """``dst`` after ``download(tmp)`` filled a sibling temp folder that is then renamed to it
    (a download that failed or was killed leaves nothing that looks complete)."""
    if (dst / COMPLETE).is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        download(tmp)
        (tmp / COMPLETE).write_text("")
        if dst.exists():  # an incomplete earlier attempt
            shutil.rmtree(dst, ignore_errors=True)
        try:
            os.replace(tmp, dst)
        except OSError:  # another process finished the same download first
            if not (dst / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def fetch_run(uri: str, run_id: str, cache: Path) -> Path:
    """The local folder of run ``run_id``'s best checkpoint (its model's, or a run's from
    before the model), downloaded once into ``cache``/``run_id`` and reused."""
    from stm.train import tracking

    client = tracking.mlflow_client(uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    if MODEL_ARTIFACT in names:
        path = MODEL_CHECKPOINT
    elif LEGACY_CHECKPOINT in names:
        path = LEGACY_CHECKPOINT
    else:
        raise UsageError(f"run {run_id} in {uri} has no model or checkpoint (did it finish?)")

    def download(tmp: Path) -> None:
        local = Path(client.download_artifacts(run_id, path, str(tmp)))
        for item in list(local.iterdir()):  # its files, flat in the cache folder
            os.replace(item, tmp / item.name)
        while local != tmp:  # the folders MLflow made for the artifact path
            local.rmdir()
            local = local.parent

    folder = _cached(cache / run_id, download)
    if not (folder / CHECKPOINT_FILE).is_file():
        raise UsageError(f"run {run_id} in {uri}: no {CHECKPOINT_FILE} in its {path}")
    return folder


def fetch_uri(ref: str, cache: Path) -> Path:
    """A checkpoint file (``.../checkpoint.pt``, or the folder holding it) from any pyarrow
    filesystem (``s3://``, ``gs://``), downloaded once into ``cache`` and reused."""
    import hashlib

    from pyarrow import fs as pafs

    from stm.storage import resolve

    filesystem, path = resolve(ref)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"

    def download(tmp: Path) -> None:
        with filesystem.open_input_stream(path) as src, open(tmp / CHECKPOINT_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)

    key = "uri-" + hashlib.sha256(ref.encode()).hexdigest()[:16]
    return _cached(cache / key, download) / CHECKPOINT_FILE
