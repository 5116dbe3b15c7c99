"""stm's home: one per-user folder for everything a run leaves when no flag says otherwise, so
that ``python jobs/train.py`` and ``ray job submit --working-dir . -- python jobs/train.py`` (which
runs in a temporary copy of the working directory) write to the same place, and
``mlflow ui --backend-store-uri sqlite:///$HOME/stm_results/mlflow.db`` works from any directory.
Ray keeps its results in ``~/ray_results`` the same way.

Layout::

    ~/stm_results/          $STM_HOME when set
        mlflow.db           the MLflow tracking store (--mlflow-uri / $MLFLOW_TRACKING_URI override)
        mlartifacts/        its artifacts: logged files, the runs' models and checkpoints
        runs/               Ray Train's run folders and checkpoints (--storage-path overrides)
        data/synthetic/     the embedded default's preprocessed dataset (synthetic-videos/ beside)
        models/             fetched models, one cached copy per run (predict, evaluate, --*-init)

On a multi-node cluster the home is per node: give ``--storage-path`` and ``--mlflow-uri`` (a
bucket and a tracking server), as the driver's warning says.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "STM_HOME"
DEFAULT_HOME = "~/stm_results"


def home() -> Path:
    """The home folder ($STM_HOME, else ~/stm_results), absolute; not created here."""
    return Path(os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_HOME)).resolve()


def tracking_uri() -> str:
    """The default MLflow store: ``sqlite:///<home>/mlflow.db``."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def runs_dir() -> str:
    """The default storage path of training runs and sweeps."""
    return str(home() / "runs")


def synthetic_data() -> Path:
    """Where the embedded default's synthetic dataset is preprocessed (kept for reruns)."""
    return home() / "data" / "synthetic"


def model_cache() -> Path:
    """Where fetched models are kept, one folder per run."""
    return home() / "models"
