"""The paper's whole recipe (``jobs/reproduce.py``): its stage configs, its report, and the
recipe on tiny synthetic data, killed by SIGKILL during the fused stage and run again with the
same command (real local Ray, real MLflow, real processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from stm.config import TrainConfig, embedded_default

from tiny import start_job, wait_for_checkpoint  # tests/tiny.py

TINY_FLAGS = [
    *("--epochs", "2", "--batch-size", "4", "--bn-batch", "4", "--crop-size", "48"),
    *("--num-chunks", "2", "--stride-min", "2", "--stride-max", "4", "--test-frames", "3"),
    *("--num-workers", "1", "--cpus-per-worker", "0.5", "--eval-every", "2"),
]


def test_stage_configs_follow_the_paper_recipe_under_the_users_flags():
    from stm.train.reproduce import stage_configs

    flags = {"data": "/d/ucf101", "num_workers": 8, "gpus_per_worker": 1.0, "epochs": 7}
    configs = stage_configs(TrainConfig(), flags, (1, 2), real_data=True)
    assert sorted(configs) == [
        f"split{k}/{s}" for k in (1, 2) for s in ("appearance", "fused", "motion")
    ]
    a, m, f = (configs[f"split2/{s}"] for s in ("appearance", "motion", "fused"))
    assert (a.stage, a.model.appearance_arch, a.model.fusion, a.num_chunks) == (
        "appearance", "resnet50", "none", 1
    )  # fmt: skip
    assert (m.model.motion_arch, m.model.motion_dropout, m.batch_size) == ("resnet152", 0.8, 128)
    assert (f.model.fusion, f.model.temporal, f.num_chunks, f.lr) == (
        "residual_mul", "residual_all", 5, 1e-3
    )  # fmt: skip
    assert {c.split for k, c in configs.items() if k.startswith("split2")} == {2}
    assert all(c.epochs == 7 and c.num_workers == 8 for c in configs.values())  # the user's
    assert (a.name, f.name) == ("split2-appearance", "split2-fused")


def test_report_shows_every_row_beside_the_papers_tables():
    from stm.train.reproduce import RecipeState, report_table, stage_configs

    configs = stage_configs(TrainConfig(), {"data": "/d"}, (1, 2), real_data=True)
    state = RecipeState("r", "/d", "hmdb51", (1, 2), configs, "p", "sqlite:///x", 3.0, "")
    row = {"appearance": 0.5, "motion": 0.6, "late_fusion": 0.65, "fused": 0.7, "videos": 10}
    text = report_table(state, {1: row, 2: {**row, "fused": 0.6}})
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 50.0 | 50.0 | 50.0 | 48.9 |" in lines["appearance stream"]  # Table 4, R50
    assert lines["motion stream"].endswith("| 60.0 | 60.0 | 60.0 | 60.0 |")  # R152
    assert lines["late fusion (two-stream)"].endswith("| 65.0 | 65.0 | 65.0 | — |")  # R50 + R152
    assert lines["fused network (STMulNet)"].endswith("| 70.0 | 60.0 | 65.0 | 68.9 |")  # Table 5
    assert "weights the motion stream by 3" in text


@pytest.mark.slow
def test_recipe_killed_in_the_fused_stage_continues_with_the_same_command(
    ray_local, synthetic, tmp_path
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,  # the test session's cluster
        RAY_AUTH_MODE="token",
    )
    args = ["--data", synthetic, *TINY_FLAGS, "--storage-path", str(runs), "--mlflow-uri", uri]
    fused_dir = runs / "reproduce-synthetic" / "runs" / "split1-fused"
    first = start_job("reproduce.py", args, env, tmp_path)
    try:  # kill the driver once the fused stage has its first checkpoint
        deadline = time.monotonic() + 900
        while not fused_dir.is_dir():
            assert first.poll() is None, first.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the fused stage did not start"
            time.sleep(0.5)
        wait_for_checkpoint(fused_dir, timeout=600)
        assert first.poll() is None, "the recipe ended before it was killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    second = start_job("reproduce.py", args, env, tmp_path)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-4000:]
    assert "stages run now: split1/fused;" in out, out[-3000:]  # the streams were not rerun

    table = out[out.index("|  | split 1 |") :]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    for name in ("appearance stream", "motion stream", "late fusion", "fused network"):
        row = next(v for k, v in rows.items() if k.startswith(name))
        assert re.search(r"\| \d+\.\d \| \d+\.\d \| — \|$", row), row  # split 1, mean, paper
    assert "do not apply to synthetic data" in out

    client = MlflowClient(tracking_uri=uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("stm").experiment_id], "tags.kind = 'recipe'"
    )
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"reproduce_report.md", "reproduce_report.png", "reproduce_report.json"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {c.data.tags["recipe_stage"]: c for c in children}
    assert sorted(by_stage) == ["appearance", "fused", "motion"] and len(children) == 3
    for stage in ("appearance", "motion"):  # ran once, to the end, before the kill
        run = by_stage[stage]
        assert run.info.status == "FINISHED" and "resumed" not in run.data.tags
        assert [h.step for h in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    fused = by_stage["fused"]
    assert fused.info.status == "FINISHED" and "resumed" in fused.data.tags
    assert fused.data.metrics["start_epoch"] == 2  # from its checkpoint of epoch 1
    assert fused.data.tags["init"].startswith("appearance from ")  # the stream runs' ids
    # the fused model of the best (only) split is the dataset's best model
    best = client.get_model_version_by_alias("stm", "best-synthetic")
    assert best.run_id == fused.info.run_id
    results = json.loads((runs / "reproduce-synthetic" / "results" / "split1.json").read_text())
    assert set(results) == {"appearance", "motion", "late_fusion", "fused", "videos"}
    assert results["videos"] == 6


def test_bad_recipe_flags_are_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for args, message in (
        (["--splits", "0"], "invalid --splits 0"),
        (["--splits", "1,1"], "each split once"),
        (["--late-fusion-weight", "-1"], "invalid --late-fusion-weight -1"),
        (["--stage", "motion"], "unrecognized arguments: --stage"),
    ):
        proc = subprocess.run(
            [sys.executable, str(root / "jobs" / "reproduce.py"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_embedded_recipe_is_small():
    from stm.train.reproduce import EMBEDDED_EPOCHS, stage_configs

    configs = stage_configs(embedded_default(), {"data": "/d"}, (1,), real_data=False)
    assert {k: c.epochs for k, c in configs.items()} == {
        f"split1/{s}": EMBEDDED_EPOCHS[s] for s in ("appearance", "motion", "fused")
    }
    assert all(c.model.appearance_arch == "resnet18" for c in configs.values())
