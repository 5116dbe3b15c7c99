"""Ablation sweeps: the paper's grids and published numbers, YAML grids and their usage errors
(no Ray), and one real sweep on the test session's Ray cluster: a two-variant grid (plus one
variant that fails) whose driver is SIGKILLed after the first trial and resumed, into MLflow
(parent run, tagged child runs, report), the best model registered, and evaluated again."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stm.config import SweepConfig, TrainConfig, UsageError, embedded_default
from stm.train.grids import BUILTIN, GRIDS, load_grid, table2, table3, trial_configs
from stm.train.report import TrialRow, paper_results, write_report
from stm.train.sweep import SweepState, best_row

from tiny import own_lines, start_job  # tests/tiny.py

ROOT = Path(__file__).resolve().parents[1]
SMOKE_FLAGS = [
    *("--epochs", "1", "--batch-size", "8", "--bn-batch", "4", "--crop-size", "48"),
    *("--num-chunks", "2", "--stride-min", "2", "--stride-max", "4", "--test-frames", "3"),
    *("--lr", "0.005", "--max-failures", "0", "--keep-checkpoints", "1"),
    *("--init", "scratch"),  # real --data: the fused stage would start from stream runs
    *("--appearance-arch", "resnet18", "--motion-arch", "resnet18", "--motion-dropout", "0.5"),
    *("--num-workers", "1", "--cpus-per-worker", "0.5"),
    *("--trial-cpus", "0.5", "--max-concurrent", "1"),
]
GRID = """\
variants:
  residual_mul-m2a: {fusion: residual_mul, direction: m2a, temporal: none, time_pool: avg}
  residual_add-m2a: {fusion: residual_add, direction: m2a, temporal: none, time_pool: avg}
  no-such-split: {split: 3}   # fails inside its trial: the table says why
"""


def _sweep_main():
    spec = importlib.util.spec_from_file_location("sweep_job", ROOT / "jobs" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# --- grids, published numbers, report (no Ray) ------------------------------------------------
def test_builtin_grids_are_the_papers_tables():
    t2 = {v.name: v.changes for v in table2()}
    assert len(t2) == 8 and t2["unconnected"]["fusion"] == "none"
    assert {(c["fusion"], c["direction"]) for n, c in t2.items() if n != "unconnected"} == {
        ("direct_add", "m2a"),
        ("direct_mul", "m2a"),
        ("residual_add", "m2a"),
        ("residual_mul", "m2a"),
        ("residual_add", "a2m"),
        ("residual_mul", "a2m"),
        ("residual_mul", "bi"),
    }
    assert all(c["temporal"] == "none" and c["time_pool"] == "avg" for c in t2.values())
    t3 = {v.name: v.changes for v in table3()}
    assert len(t3) == 9 and all(c["fusion"] == "residual_mul" for c in t3.values())
    assert {(c["temporal"], c.get("temporal_init"), c["time_pool"]) for c in t3.values()} == {
        ("none", None, "avg"),
        ("residual_last", "avg", "avg"),
        ("skip_all", "avg", "avg"),
        ("residual_all", "avg", "avg"),
        ("skip_all", "center", "avg"),
        ("residual_last", "center", "avg"),
        ("residual_all", "center", "avg"),
        ("skip_all", "center", "max"),
        ("residual_all", "center", "max"),
    }
    # every variant builds a valid config on the paper's defaults
    configs = trial_configs(TrainConfig(), load_grid("table3"))
    assert configs["residual_all-center-maxpool"].model == TrainConfig().model  # the final model


def test_paper_numbers_cover_the_grids_and_name_their_source():
    paper = paper_results()
    assert "CVPR 2017" in paper["source"] and "Table 2" in paper["source"]
    for table in GRIDS:
        rows = {r["key"]: r for r in paper["tables"][table]["rows"]}
        assert set(rows) == {v.name for v in BUILTIN[table]()}
    t2 = {r["key"]: r for r in paper["tables"]["table2"]["rows"]}
    # confirmed by the running text (Sect. 5.1); the rest of Table 2 is marked uncertain
    assert (t2["residual_add-m2a"]["ucf101"], t2["residual_add-m2a"]["hmdb51"]) == (9.38, 41.89)
    assert (t2["residual_mul-m2a"]["ucf101"], t2["residual_mul-m2a"]["hmdb51"]) == (8.72, 37.23)
    assert all(r["uncertain"] for k, r in t2.items() if k in ("direct_add-m2a", "residual_mul-bi"))
    t3 = {r["key"]: r for r in paper["tables"]["table3"]["rows"]}
    assert t3["residual_all-center-maxpool"]["ucf101"] == 6.00
    assert t3["residual_all-center-maxpool"]["hmdb51"] == 30.98


def test_report_has_the_papers_layout_uncertain_marks_and_failures(tmp_path):
    base = embedded_default(data=str(tmp_path))
    grid = load_grid("table2", ("direct_add-m2a", "residual_mul-m2a"))
    configs = trial_configs(base, grid)
    # as a resumed sweep reads it: through sweep.json
    fresh = SweepState("s", grid, SweepConfig(name="s"), configs, "p", "sqlite:///m.db", "now")
    state = SweepState.from_json(fresh.to_json())
    rows = [
        TrialRow("direct_add-m2a", "failed", reason="boom"),
        TrialRow("residual_mul-m2a", "ok", error=12.5, epoch=6, metrics={"score": 0.875}),
    ]
    text = write_report(
        state.grid, state.configs, rows, str(tmp_path), sweep=state.name, parent_run_id="p"
    )
    lines = text.splitlines()
    assert lines[0].startswith("| connection | fusion | direction | Fig. | UCF101 (paper)")
    direct = next(ln for ln in lines if "Fig. 2(a)" in ln)
    assert "24.78?" in direct and "failed" in direct and "boom" in direct
    mul = next(ln for ln in lines if "Fig. 2(d), Sect. 3.2.2" in ln)
    assert "| 8.72 | 37.23 | 12.50 |" in mul
    assert "uncertain" in text.lower() and "CVPR 2017" in text
    assert (tmp_path / "ablation_report.png").stat().st_size > 1000
    assert (tmp_path / "ablation_report.md").read_text() == text
    saved = json.loads((tmp_path / "ablation_report.json").read_text())
    assert (saved["sweep"], saved["grid"], saved["parent_run_id"]) == ("s", "table2", "p")
    assert [r["status"] for r in saved["rows"]] == ["failed", "ok"]
    assert best_row(rows).variant == "residual_mul-m2a"


def test_sweep_state_round_trips_through_sweep_json(tmp_path):
    """What --resume and every trial read back is what the sweep started with, tuples and
    the variants' order included."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        "base: {epochs: 2, lr_milestones: [1]}\n"
        "variants: {b: {fusion: residual_add, lr_milestones: [1, 2]}, a: {fusion: none}}\n"
    )
    grid = load_grid(str(path))
    configs = trial_configs(embedded_default(data=str(tmp_path)), grid)
    sweep = SweepConfig(grid=str(path), only=("b", "a"), name="s", asha=True)
    state = SweepState("s", grid, sweep, configs, "parent", "sqlite:///m.db", "now")
    state.save(str(tmp_path / "s"))
    loaded = SweepState.load(str(tmp_path / "s"))
    assert loaded == state and list(loaded.configs) == ["b", "a"]
    assert loaded.configs["b"].lr_milestones == (1, 2) and loaded.sweep.only == ("b", "a")
    assert loaded.grid.variants[0].changes["lr_milestones"] == (1, 2)
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    keys = ("name", "grid", "sweep", "configs", "parent_run_id", "tracking_uri", "created")
    assert list(saved) == list(keys)
    assert saved["configs"]["a"]["model"]["fusion"] == "none"
    assert SweepState.load(str(tmp_path / "nosuch")) is None


@pytest.mark.parametrize(
    "grid,message",
    [
        ("variants:\n  a: {fusion: concat}\n", "--fusion: invalid choice 'concat'"),
        ("variants:\n  a: {fuson: residual_mul}\n", "unknown flag --fuson"),
        ("variants:\n  a: {epochs: many}\n", "--epochs: expected an integer"),
        ("variants:\n  a: {bn_batch: 3}\n", "variant a: --bn-batch 3 must divide"),
        ("grid: {lr: []}\n", "grid: lr: no values"),
        ("variants: [a\n", "not valid YAML"),
        ("base: {name: x}\nvariants: {a: {}}\n", "--name is set for the whole sweep"),
        ("epochs: 3\n", "unknown key 'epochs'"),
        (None, "cannot read it"),
    ],
)
def test_bad_grid_file_is_one_line_and_exit_2(tmp_path, capsys, grid, message):
    path = tmp_path / "grid.yaml"
    if grid is not None:
        path.write_text(grid)
    with pytest.raises(SystemExit) as exit_:
        _sweep_main()(["--grid", str(path)])
    assert exit_.value.code == 2
    lines = own_lines(capsys.readouterr().err)  # not other tests' forwarded Ray worker logs
    assert len(lines) == 1 and lines[0].startswith("sweep.py: error: ") and message in lines[0]


def test_yaml_grid_product_and_base(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "base: {epochs: 3}\nvariants: {m: {fusion: residual_mul}}\n"
        "grid: {lr: [0.001, 0.01], time-pool: [max]}\n"
    )
    grid = load_grid(str(path))
    assert [v.name for v in grid.variants] == [
        "m_lr=0.001,time_pool=max",
        "m_lr=0.01,time_pool=max",
    ]
    configs = trial_configs(embedded_default(), grid)
    assert {c.epochs for c in configs.values()} == {3}
    assert {c.lr for c in configs.values()} == {0.001, 0.01}
    with pytest.raises(UsageError, match="no such variant"):
        load_grid("table2", ("nope",))


# --- a real sweep --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_data(synthetic) -> str:
    """The session's preprocessed synthetic videos (tests/conftest.py)."""
    return synthetic


def _trial_status(tune_dir: Path) -> dict[str, str]:
    """Tune's saved view of its trials (what a restore starts from): variant -> status."""
    out: dict[str, str] = {}
    for path in tune_dir.glob("experiment_state-*.json"):
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            out[trial["custom_dirname"] or trial["trial_id"]] = trial["status"]
    return out


def _job(args: list[str], env: dict, tmp: Path) -> subprocess.Popen:
    return start_job("sweep.py", args, env, tmp)


@pytest.mark.slow
def test_sweep_killed_driver_resumes_then_reports_registers_and_evaluates(
    ray_local, sweep_data, tmp_path
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,  # the test session's cluster
        RAY_AUTH_MODE="token",
    )
    (tmp_path / "grid.yaml").write_text(GRID)
    common = ["--storage-path", str(tmp_path / "runs"), "--mlflow-uri", uri, "--name", "swp"]
    first = _job(
        ["--grid", "grid.yaml", "--data", sweep_data, *SMOKE_FLAGS, *common]
        + ["--model-name", "stm-sweep-test"],
        env,
        tmp_path,
    )
    tune_dir = tmp_path / "runs" / "swp" / "tune"
    try:  # kill the driver once Tune has saved the first trial as finished
        deadline = time.monotonic() + 900
        while _trial_status(tune_dir).get("residual_mul-m2a") != "TERMINATED":
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first trial did not finish"
            time.sleep(0.5)
        statuses = _trial_status(tune_dir)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert statuses.get("no-such-split") != "ERROR", "the sweep ended before it was killed"

    second = _job(["--resume", *common], env, tmp_path)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-4000:]

    # the report, printed: the grid's rows, ours beside the paper's, the failure and its reason
    table = out[out.index("| variant |") :]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert re.search(r"\| 8\.72 \| 37\.23 \| \d+\.\d\d \|", rows["residual_mul-m2a"])
    assert re.search(r"\| 9\.38 \| 41\.89 \| \d+\.\d\d \|", rows["residual_add-m2a"])
    assert "failed" in rows["no-such-split"] and "--split 3" in rows["no-such-split"]
    assert "2 ok, 1 failed" in out and "registered as stm-sweep-test/" in out

    client = MlflowClient(tracking_uri=uri)
    parents = client.search_runs(
        [client.get_experiment_by_name("stm").experiment_id], "tags.kind = 'sweep'"
    )
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["grid"] == "grid"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation_report.md", "ablation_report.png", "ablation_report.json"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_variant = {c.data.tags["variant"]: c for c in children}
    assert len(children) == 3 and set(by_variant) == {
        "residual_mul-m2a",
        "residual_add-m2a",
        "no-such-split",
    }
    for name, child in by_variant.items():
        assert child.data.tags["grid"] == "grid" and child.data.tags["sweep"] == "swp"
        assert child.info.run_name == name
    done = by_variant["residual_mul-m2a"]
    assert done.info.status == "FINISHED" and done.data.tags["model_variant"].startswith(
        "fusion=residual_mul/m2a temporal=none"
    )
    assert "resumed" not in done.data.tags  # the finished trial was not run again
    assert [h.step for h in client.get_metric_history(done.info.run_id, "epoch")] == [1]
    assert by_variant["residual_add-m2a"].info.status == "FINISHED"
    failed = by_variant["no-such-split"]
    assert failed.info.status == "FAILED" and "--split 3" in failed.data.tags["error"]

    # every finished trial registered its model; the parent names the best trial's version,
    # and the dataset's alias the highest score; evaluate defaults to that alias, and its rerun
    # of the test protocol agrees with the accuracy the checkpoint recorded during training
    best = parent.data.tags["best_variant"]
    versions = client.search_model_versions("name = 'stm-sweep-test'")
    assert sorted(v.run_id for v in versions) == sorted(
        by_variant[v].info.run_id for v in ("residual_mul-m2a", "residual_add-m2a")
    )
    name, number = parent.data.tags["registered_model"].split("/")
    assert client.get_model_version(name, number).run_id == by_variant[best].info.run_id
    alias = f"best-{Path(sweep_data).name.lower()}-split1"
    top = client.get_model_version_by_alias("stm-sweep-test", alias)
    assert float(top.tags["score"]) == max(float(v.tags["score"]) for v in versions)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--data", sweep_data]
        + ["--model", f"models:/stm-sweep-test@{alias}", "--mlflow-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fused = float(re.search(r"fused (\d+\.\d)%", proc.stdout).group(1))
    assert "6 test videos" in proc.stdout and "(window/logits)" in proc.stdout
    for protocol in ("window/logits", "window/softmax", "global/logits", "global/softmax"):
        assert f"test protocol {protocol}: appearance" in proc.stdout  # all from one pass
    import torch

    from stm.train.registry import fetch_model

    folder, _ = fetch_model(uri, f"models:/stm-sweep-test@{alias}")
    recorded = torch.load(folder / "checkpoint.pt", weights_only=True)["metrics"]
    assert fused == pytest.approx(100 * recorded["test_video_acc_fused"], abs=0.05)
