"""stm's home: where results go when no flag says otherwise, whatever the working directory."""

from __future__ import annotations

from pathlib import Path

from stm import home
from stm.config import TrainConfig
from stm.train.runs import storage_root
from stm.train.tracking import check_reachable, resolve_uri


def test_defaults_follow_the_home_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("STM_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("") == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert storage_root(TrainConfig()) == str(tmp_path / "h" / "runs")
    assert home.synthetic_data() == tmp_path / "h" / "data" / "synthetic"
    assert home.model_cache() == tmp_path / "h" / "models"
    check_reachable(resolve_uri(""))  # the home's folder is made for the store
    assert (tmp_path / "h").is_dir()
    # flags and MLflow's own variable still win; a relative SQLite path is made absolute
    assert storage_root(TrainConfig(storage_path="s3://b/runs/")) == "s3://b/runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri("") == "http://mlflow:5000"
    assert resolve_uri("sqlite:///x.db") == f"sqlite:///{tmp_path / 'x.db'}"


def test_without_stm_home_it_is_the_users_folder(monkeypatch):
    monkeypatch.delenv("STM_HOME", raising=False)
    assert home.home() == (Path.home() / "stm_results").resolve()
