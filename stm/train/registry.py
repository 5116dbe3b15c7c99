"""Trained models in the MLflow model registry, and loading them back from ``models:/`` URIs,
run ids or local paths.

A registered model is an MLflow ``pyfunc`` model whose artifact ``checkpoint`` is a folder::

    checkpoint.pt   the self-describing training checkpoint (config + class names + weights)
    config.json     the same config, readable without torch
    classes.json    the class names (index = label)
    dataset.json    how the training data was preprocessed (flow algorithm, short side, JPEG
                    quality): prediction prepares a new video the same way

The model also carries the ``stm`` source (``code_paths``), so ``mlflow.pyfunc.load_model``
works where stm is not installed; its ``predict`` takes video paths and returns the top-5
classes of each. ``jobs/predict.py`` and ``jobs/evaluate.py`` skip pyfunc: they download the
folder and rebuild the network with ``stm.train.loop.model_from_checkpoint``.

Every function names its tracking URI: no global MLflow state.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from stm.config import UsageError
from stm.train import tracking

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the pyfunc model's folder in its run's artifacts
CHECKPOINT_KEY = "checkpoint"  # the pyfunc artifact holding the checkpoint folder
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_CHECKPOINT = "best_checkpoint"  # what stm.train.run logs for every training run
REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "av",
    "opencv-contrib-python-headless",
    "pyarrow",
    "mlflow",
)


def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


class STMVideoClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc model: ``predict`` takes video paths (a list, or a DataFrame with a ``video``
    column) and returns one row per (video, rank): the top-k classes (``params={"top_k": 5}``)
    and their fused scores."""

    # Its input is a list of paths or a DataFrame, which MLflow's type-hint validation cannot
    # express: skip it (and MLflow's "add type hints" warning).
    _skip_type_hint_validation = True

    def load_context(self, context):
        from stm.train.predict import load_model_dir

        self.loaded = load_model_dir(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from stm.train.predict import predict_video

        videos = (
            list(model_input["video"]) if hasattr(model_input, "columns") else list(model_input)
        )
        top_k = int((params or {}).get("top_k", 5))
        rows = []
        for video in videos:
            pred = predict_video(self.loaded, str(video), top_k=top_k)
            for rank, (name, score) in enumerate(pred.top, start=1):
                rows.append({"video": video, "rank": rank, "class": name, "score": score})
        return pd.DataFrame(rows)


def bundle(checkpoint: str | Path, dst: str | Path, data: str = "") -> Path:
    """The model folder (see the module doc) from a checkpoint file or folder; ``data`` is
    the preprocessed dataset it trained on (for dataset.json and, if needed, classes.json)."""
    import torch

    from stm.data.shards import read_classes, read_dataset_info

    src = Path(checkpoint)
    if src.is_dir():
        src = src / CHECKPOINT_FILE
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst / CHECKPOINT_FILE)
    state = torch.load(src, map_location="cpu", weights_only=True)
    classes = list(state.get("class_names") or [])
    data = data or state["config"].get("data", "")
    info: dict[str, Any] = {}
    if data:
        try:
            info = read_dataset_info(data)
            classes = classes or read_classes(data)
        except (FileNotFoundError, OSError, ValueError) as err:
            log.warning("no dataset description for %s: %s", data, err)
    (dst / "config.json").write_text(json.dumps(state["config"], indent=1))
    (dst / "classes.json").write_text(json.dumps(classes, indent=1))
    (dst / "dataset.json").write_text(json.dumps(info, indent=1))
    return dst


def register_checkpoint(
    uri: str,
    run_id: str,
    checkpoint: str | Path,
    name: str,
    *,
    data: str = "",
    tags: dict[str, str] | None = None,
) -> int:
    """Log a checkpoint as a pyfunc model into run ``run_id`` (artifact ``model``) and register
    it as a new version of ``name``; returns the version number."""
    import torch

    import stm

    client = tracking.mlflow_client(uri)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="stm-model-") as tmp:
        folder = bundle(checkpoint, Path(tmp) / "bundle", data)
        config = json.loads((folder / "config.json").read_text())
        local = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=STMVideoClassifier(),
            artifacts={CHECKPOINT_KEY: str(folder)},
            code_paths=[str(Path(stm.__file__).parent)],
            pip_requirements=_requirements(),
            metadata={"stm_config": config, "torch": str(torch.__version__)},
        )
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    try:
        client.create_registered_model(
            name, description="Spatiotemporal Multiplier Network (stm): best sweep trials"
        )
    except Exception as err:  # noqa: BLE001 - it exists already (the store's error type varies)
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    model = config["model"]
    version_tags = {
        "stage": str(config.get("stage", "")),
        **{f"model.{k}": str(v) for k, v in model.items()},
        **(tags or {}),
    }
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}",
        run_id=run_id,
        tags=version_tags,
        description=f"run {run.info.run_name} ({run_id})",
    )
    log.info("registered %s version %s from run %s", name, mv.version, run_id)
    return int(mv.version)


_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")


def model_version(uri: str, ref: str) -> Any:
    """The registry entry of ``models:/NAME/VERSION``, ``models:/NAME/latest`` (the newest
    version, whatever its stage or alias) or ``models:/NAME@ALIAS``."""
    m = _VERSION.match(ref)
    if not m:
        raise UsageError(f"--model {ref}: expected models:/NAME/VERSION, /latest or @ALIAS")
    client = tracking.mlflow_client(uri)
    name = m["name"]
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(name, m["alias"])
        version = m["version"]
        if version.lower() == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise UsageError(f"--model {ref}: no registered model {name} in {uri}")
            return max(versions, key=lambda v: int(v.version))
        if version.isdigit():
            return client.get_model_version(name, version)
        latest = client.get_latest_versions(name, [version])  # a stage (deprecated in MLflow)
        if not latest:
            raise UsageError(f"--model {ref}: no version of {name} in stage {version}")
        return latest[0]
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - the store's "not found" errors, in one line
        reason = " ".join(str(err).split())[:200]
        raise UsageError(f"--model {ref}: {reason}") from None


def _find_checkpoint(local: Path, what: str) -> Path:
    if local.is_file():
        return local.parent
    found = sorted(local.rglob(CHECKPOINT_FILE))
    if not found:
        raise UsageError(f"{what}: no {CHECKPOINT_FILE} in it")
    return found[0].parent


def fetch_model(
    uri: str, model: str = "", run_id: str = "", dst: str | None = None
) -> tuple[Path, str]:
    """A local model folder (holding checkpoint.pt) and a description of where it came from.

    Args:
        uri: the MLflow tracking URI.
        model: ``models:/NAME/latest``, ``models:/NAME/3``, ``models:/NAME@ALIAS``,
            ``runs:/RUN/PATH``, or a local checkpoint file or folder.
        run_id: instead of ``model``: a run's registered-style model (artifact ``model``) or
            else its training checkpoint (``best_checkpoint``).
        dst: where to download (default: a new temporary folder).
    """
    import mlflow.artifacts

    if bool(model) == bool(run_id):
        raise UsageError("give one of --model or --run-id")
    dst = dst or tempfile.mkdtemp(prefix="stm-fetch-")
    try:
        if run_id:
            names = {a.path for a in tracking.mlflow_client(uri).list_artifacts(run_id)}
            path = MODEL_ARTIFACT if MODEL_ARTIFACT in names else TRAINING_CHECKPOINT
            if path not in names:
                raise UsageError(f"--run-id {run_id}: the run has no model or checkpoint")
            local = tracking.mlflow_client(uri).download_artifacts(run_id, path, dst)
            return _find_checkpoint(Path(local), f"--run-id {run_id}"), f"run {run_id}/{path}"
        if model.startswith("models:/"):
            mv = model_version(uri, model)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=dst, tracking_uri=uri
            )
            what = f"{mv.name} version {mv.version} (run {mv.run_id})"
            return _find_checkpoint(Path(local), f"--model {model}"), what
        if model.startswith("runs:/"):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=model, dst_path=dst, tracking_uri=uri
            )
            return _find_checkpoint(Path(local), f"--model {model}"), model
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - unknown run, missing artifact: one line
        reason = " ".join(str(err).split())[:200]
        raise UsageError(
            f"--{'run-id' if run_id else 'model'} {run_id or model}: {reason}"
        ) from None
    path = Path(model)
    if not path.exists():
        raise UsageError(f"--model {model}: no such file, and not a models:/ or runs:/ URI")
    return _find_checkpoint(path, f"--model {model}"), str(path)
