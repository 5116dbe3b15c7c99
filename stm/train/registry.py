"""Trained models in the MLflow model registry, and loading them back from ``models:/`` URIs,
run ids or local paths.

Every finished training run logs its best checkpoint once, as its MLflow ``pyfunc`` model
(artifact ``model``), whose artifact ``checkpoint`` is a folder::

    checkpoint.pt   the self-describing checkpoint (config, class names, the dataset's
                    preprocessing settings, weights; no optimiser state)
    config.json     the same config, readable without torch
    classes.json    the class names (index = label)
    dataset.json    how the training data was preprocessed (flow algorithm, short side, JPEG
                    quality): prediction prepares a new video the same way

and registers it as a version of ``--model-name`` (default ``stm``) pointing at that artifact,
tagged with its score, dataset and split. The alias ``best-<dataset>-split<k>`` follows the
highest score per dataset and split, ``best`` the best of the dataset and split registered
last; ``jobs/predict.py`` and ``jobs/evaluate.py`` default to them.

The model also carries the ``stm`` source (``code_paths``) and a signature, so
``mlflow.pyfunc.load_model`` works where stm is not installed; its ``predict`` takes a DataFrame
with a ``video`` column of paths and returns the top-k classes of each. The model is an MLflow
"model from code" (``pyfunc_model.py``), not a pickled object, but loading it still runs the
Python source stored with it: load only from a store you trust. ``jobs/predict.py`` and
``jobs/evaluate.py`` run no stored code: they fetch the checkpoint folder (one cached copy per
run, ``stm.train.checkpoint.fetch_run``) and read it with ``torch.load(weights_only=True)``.

Every function names its tracking URI: no global MLflow state.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from stm.config import UsageError
from stm.train import tracking
from stm.train.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_ARTIFACT,
    checkpoint_file,
    fetch_run,
    write_model_folder,
)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "checkpoint"  # the pyfunc artifact holding the checkpoint folder
TRAINING_ONLY = ("optimizer", "scheduler")  # checkpoint entries a model does not need
BEST = "best"  # the alias of the best version of the dataset and split registered last
SCORE_TAG = "score"  # a version's tag: its checkpoint's fused (or stream) test video accuracy
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video")]),
    outputs=Schema(
        [
            ColSpec("string", "video"),
            ColSpec("long", "rank"),
            ColSpec("string", "class"),
            ColSpec("double", "score"),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", "long", 5)]),
)
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


def log_model(uri: str, run_id: str, checkpoint: str | Path) -> None:
    """Log a checkpoint as run ``run_id``'s pyfunc model (artifact ``model``): the store's one
    copy of it, without the optimiser state (registered versions point at it)."""
    import torch

    import stm

    with tempfile.TemporaryDirectory(prefix="stm-model-") as tmp:
        state = torch.load(checkpoint_file(checkpoint), map_location="cpu", weights_only=True)
        slim = Path(tmp) / CHECKPOINT_FILE
        torch.save({k: v for k, v in state.items() if k not in TRAINING_ONLY}, slim)
        folder = write_model_folder(slim, Path(tmp) / "staging" / CHECKPOINT_KEY)
        slim.unlink()
        local = Path(tmp) / MODEL_ARTIFACT
        with warnings.catch_warnings():  # "no input example": a video path cannot be one
            warnings.filterwarnings("ignore", message=".*input example.*")
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # code, no pickle
                artifacts={CHECKPOINT_KEY: str(folder)},
                code_paths=[str(Path(stm.__file__).parent)],
                pip_requirements=_requirements(),
                signature=SIGNATURE,
                metadata={"stm_config": state["config"], "torch": str(torch.__version__)},
            )
        shutil.rmtree(folder)
        tracking.mlflow_client(uri).log_artifacts(run_id, str(local), MODEL_ARTIFACT)


def dataset_key(data: str) -> str:
    """A dataset's short name for tags and aliases: its folder's name (``s3://b/ucf101-tvl1``
    -> ``ucf101-tvl1``), letters, digits, ``_`` and ``-`` only."""
    name = data.rstrip("/").rsplit("/", 1)[-1] or "data"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower() or "data"


def best_alias(dataset: str = "", split: int = 0) -> str:
    """``best-<dataset>-split<k>``: the best version for one dataset and split; ``best``
    without them: the best version of the dataset and split registered last."""
    return f"{BEST}-{dataset}-split{split}" if dataset else BEST


def default_model(name: str = "stm", data: str = "", split: int = 0) -> str:
    """The model predict and evaluate use when none is given: ``models:/stm@best``, or for a
    dataset and split ``models:/stm@best-<dataset>-split<k>``."""
    return f"models:/{name}@{best_alias(dataset_key(data) if data else '', split)}"


def register_run(
    uri: str,
    run_id: str,
    name: str,
    *,
    score: float,
    data: str,
    split: int,
    tags: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Register run ``run_id``'s model (``log_model``) as a new version of ``name``, tagged
    with its score, dataset and split, and move the aliases (``update_aliases``); returns the
    version and the dataset's alias."""
    client = tracking.mlflow_client(uri)
    run = client.get_run(run_id)
    try:
        client.create_registered_model(
            name, description="Spatiotemporal Multiplier Network (stm): trained runs"
        )
    except Exception as err:  # noqa: BLE001 - it exists already (the store's error type varies)
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    config = run.data.params
    dataset = dataset_key(data)
    version_tags = {
        SCORE_TAG: f"{score:.6f}",
        "dataset": dataset,
        "data": data,
        "split": str(split),
        "stage": config.get("stage", ""),
        "variant": run.data.tags.get("variant", ""),
        **(tags or {}),
    }
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}",
        run_id=run_id,
        tags=version_tags,
        description=f"run {run.info.run_name} ({run_id}): {dataset} split {split}, "
        f"score {score:.4f}",
    )
    alias = update_aliases(uri, name, dataset, split)
    log.info("registered %s version %s from run %s (%s)", name, mv.version, run_id, alias)
    return int(mv.version), alias


def update_aliases(uri: str, name: str, dataset: str, split: int) -> str:
    """Point ``best-<dataset>-split<k>`` at the highest-scoring version of that dataset and
    split (ties: the newer), and ``best`` at the same version. Recomputed from every version,
    so concurrent registrations (sweep trials) converge. Returns the dataset's alias."""
    client = tracking.mlflow_client(uri)
    versions = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get("dataset") == dataset and v.tags.get("split") == str(split)
    ]
    alias = best_alias(dataset, split)
    if versions:
        top = max(versions, key=lambda v: (float(v.tags.get(SCORE_TAG, "-1")), int(v.version)))
        client.set_registered_model_alias(name, alias, top.version)
        client.set_registered_model_alias(name, BEST, top.version)
    return alias


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
        raise UsageError(f"--model {ref}: {reason} (MLflow store {uri})") from None


def fetch_model(uri: str, model: str = "", run_id: str = "") -> tuple[Path, str]:
    """A local checkpoint (file, or folder holding checkpoint.pt) and where it came from.

    Args:
        uri: the MLflow tracking URI.
        model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest``,
            ``runs:/RUN/...``, or a local checkpoint file or folder (that file is loaded).
        run_id: instead of ``model``: a training run's best checkpoint.

    Downloads are cached under the home (``stm.home.model_cache``), one copy per run.
    """
    from stm import home

    if bool(model) == bool(run_id):
        raise UsageError("give one of --model or --run-id")
    if run_id or model.startswith(("models:/", "runs:/")):
        flag = f"--run-id {run_id}" if run_id else f"--model {model}"
        try:
            what = f"run {run_id}"
            if model.startswith("models:/"):
                mv = model_version(uri, model)
                run_id, what = mv.run_id, f"{mv.name} version {mv.version} (run {mv.run_id})"
            elif model.startswith("runs:/"):
                run_id, what = model[len("runs:/") :].split("/", 1)[0], model
            return fetch_run(uri, run_id, home.model_cache()), what
        except UsageError as err:
            text = str(err)
            raise UsageError(text if text.startswith("--") else f"{flag}: {text}") from None
        except Exception as err:  # noqa: BLE001 - unknown run, missing artifact: one line
            reason = " ".join(str(err).split())[:200]
            raise UsageError(f"{flag}: {reason} (MLflow store {uri})") from None
    path = Path(model)
    if path.is_dir() and not (path / CHECKPOINT_FILE).is_file():
        raise UsageError(f"--model {model}: no {CHECKPOINT_FILE} in it")
    if not path.exists():
        raise UsageError(f"--model {model}: no such file, and not a models:/ or runs:/ URI")
    return path, str(path)
