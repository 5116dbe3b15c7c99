"""Shared fixtures: one local Ray instance per test session (Ray start-up costs seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Tests never download anything and never talk to a remote cluster.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# stm's home (results, the MLflow store, fetched models) is the session's own, never ~/stm_results:
# set before Ray starts, so every Ray worker and every subprocess a test starts inherits it.
os.environ["STM_HOME"] = tempfile.mkdtemp(prefix="stm-test-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (2 CPUs, small object store), shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster that `ray start` left on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory, ray_local) -> str:
    """30 synthetic videos (6 classes x 5: 24 train, 6 test), DIS flow, preprocessed once per
    session into a dataset folder named ``synthetic`` (its name in registry tags and aliases).
    Read-only: a test that changes a dataset makes its own."""
    from stm.config import PreprocessConfig
    from stm.data.preprocess import run_preprocess

    base = tmp_path_factory.mktemp("synthetic")
    out = base / "synthetic"
    summary = run_preprocess(
        PreprocessConfig(
            source="synthetic",
            root=str(base / "videos"),
            out=str(out),
            flow="dis",
            num_videos=30,
            synthetic_frames=16,
        )
    )
    assert summary.ok == 30
    return str(out)
