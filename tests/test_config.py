"""Configs and the command lines generated from them: every wrong value is one line and exit
status 2 from the job, before Ray (or torch) starts; every flag has help text."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from stm import config as C

ROOT = Path(__file__).resolve().parents[1]


def job(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("train", ["--lr", "-1"], "--lr -1"),
        ("train", ["--cpus-per-worker", "-1"], "--cpus-per-worker"),
        ("train", ["--keep-checkpoints", "-1"], "--keep-checkpoints -1"),
        ("train", ["--experiment", ""], "invalid --experiment ''"),
        ("train", ["--name", "../elsewhere"], "invalid --name"),
        ("train", ["--momentum", "1.5"], "--momentum 1.5"),
        ("train", ["--seed", "-3"], "--seed -3"),
        ("train", ["--crop-size", "100000"], "--crop-size 100000"),
        ("train", ["--lr-milestones", "0"], "--lr-milestones"),
        ("train", ["--fusion", "concat"], "invalid choice"),
        ("train", ["--epochs", "many"], "invalid int value"),
        ("train", ["--data", "d"], "the fused stage starts from the stream runs"),
        ("train", ["--data", "d", "--motion-init", "R"], "give --appearance-init"),
        ("train", ["--init", "scratch", "--motion-init", "R"], "disagree"),
        ("preprocess", ["--out", "x", "--seed", "-1"], "--seed -1"),
        ("preprocess", ["--out", "x", "--jpeg-quality", "0"], "--jpeg-quality 0"),
        ("preprocess", ["--out", "x", "--workers", "0"], "--workers 0"),
        ("preprocess", ["--source", "ucf101", "--out", "x"], "--root is required"),
        ("preprocess", ["--source", "synthetic"], "--out is required"),
        ("preprocess", ["--out", "x", "--flow", "magic"], "invalid choice"),
        ("sweep", ["--grid", "table2", "--trial-cpus", "-1"], "--trial-cpus -1"),
        ("sweep", ["--grid", "table2", "--name", "a/b"], "invalid --name"),
        ("predict", ["video.avi", "--short-side", "-5"], "--short-side -5"),
        ("predict", ["video.avi", "--top-k", "0"], "--top-k 0"),
        ("predict", ["video.avi", "--device", "tpu"], "invalid --device"),
        ("evaluate", ["--data", "d", "--split", "0"], "--split 0"),
        ("evaluate", ["--split", "1"], "--data is required"),
    ],
)
def test_bad_values_are_one_line_and_exit_2_before_ray(name, args, message) -> None:
    start = time.perf_counter()
    proc = job(name, *args)
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert lines[0].startswith(f"{name}.py: error: ")
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()
    assert seconds < 30  # parsing only: nothing imported torch's or Ray's start-up


@pytest.mark.parametrize("name", ["train", "preprocess", "sweep", "predict", "evaluate"])
def test_every_flag_has_help_from_its_field(name) -> None:
    proc = job(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "(default:" in proc.stdout


def test_field_help_reads_the_comments() -> None:
    for cls in (C.TrainConfig, C.ModelConfig, C.PreprocessConfig, C.SweepConfig):
        helps = C.field_help(cls)
        names = set(C.field_names(cls)) - {"model"}
        assert names <= set(helps) and all(helps[n] for n in names), cls.__name__
    helps = C.field_help(C.TrainConfig)
    assert "Sect. 4.1" in helps["batch_size"]
    assert helps["decode"].startswith("cpu: Ray Data workers decode")  # a comment block above
    model = C.field_help(C.ModelConfig)
    assert "eq. 5" in model["fusion"] and model["zero_init_residual"].startswith("Training from")


def test_choices_live_next_to_their_fields() -> None:
    from stm.data.flow import FLOW_ESTIMATORS

    assert set(C.FLOWS) == set(FLOW_ESTIMATORS)
    with pytest.raises(C.UsageError, match="choose one of"):
        C.ModelConfig(time_pool="median")


def test_with_changes_applies_nested_model_fields_and_rejects_unknown_ones() -> None:
    cfg = C.with_changes(C.TrainConfig(), {"lr": 0.5, "fusion": "none", "lr_milestones": [4]})
    assert (cfg.lr, cfg.model.fusion, cfg.lr_milestones) == (0.5, "none", (4,))
    with pytest.raises(C.UsageError, match="unexpected keyword"):
        C.with_changes(C.TrainConfig(), {"no_such_field": 1})
    assert C.from_dict(C.TrainConfig, C.to_dict(cfg)) == cfg


def _train(*argv: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse(list(argv))[0]


@pytest.mark.parametrize("stage", ["appearance", "motion"])
def test_stream_stages_select_their_recipe(stage) -> None:
    """--stage appearance|motion on real data: the stream alone (no gates, no temporal filters,
    one sample per video), its batch, crops, dropout and lr schedule; flags still override."""
    cfg = _train("--data", "d", "--stage", stage, "--num-workers", "8", "--gpus-per-worker", "1")
    assert (cfg.model.fusion, cfg.model.temporal, cfg.num_chunks) == ("none", "none", 1)
    assert cfg.lr == 1e-2 and len(cfg.lr_milestones) == 2 and cfg.resolved_init == "imagenet"
    if stage == "appearance":
        assert (cfg.batch_size, cfg.crop_mode, cfg.model.appearance_arch) == (
            256,
            "jitter",
            "resnet50",
        )
    else:
        assert (cfg.batch_size, cfg.crop_mode, cfg.model.motion_dropout) == (128, "multiscale", 0.8)
        assert cfg.model.motion_arch == "resnet152" and cfg.epochs > 3 * cfg.lr_milestones[0] / 2
    assert cfg.accum_steps * cfg.bn_batch * cfg.num_workers == cfg.batch_size
    override = _train("--data", "d", "--stage", stage, "--lr", "0.05", "--bn-batch", "4")
    assert override.lr == 0.05 and override.bn_batch == 4


def test_fused_stage_recipe_and_init() -> None:
    cfg = _train("--data", "d", "--appearance-init", "A", "--motion-init", "M")
    assert (cfg.model.fusion, cfg.model.temporal, cfg.num_chunks) == (
        "residual_mul",
        "residual_all",
        5,
    )
    assert cfg.lr == 1e-3 and cfg.resolved_init == "streams"
    assert _train("--data", "d", "--init", "imagenet").resolved_init == "imagenet"
    embedded = _train()
    assert embedded.resolved_init == "scratch"
    assert _train("--stage", "motion").num_chunks == 1  # the stream structure, small sizes


def test_every_readme_command_uses_flags_its_job_has():
    """Each ``python jobs/X.py ...`` line of the README (continuations joined) names a job that
    exists, and every flag it gives is one of that job's (from the job's own --help)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"python (jobs/\w+\.py)([^\n#`]*)", text)
    assert {c for c, _ in commands} >= {
        "jobs/train.py", "jobs/predict.py", "jobs/evaluate.py", "jobs/sweep.py",
        "jobs/preprocess.py", "jobs/reproduce.py",
    }  # fmt: skip
    helps: dict[str, str] = {}
    for job, args in commands:
        assert (root / job).is_file(), job
        if job not in helps:
            proc = subprocess.run(
                [sys.executable, job, "--help"], cwd=root, capture_output=True, text=True
            )
            assert proc.returncode == 0, proc.stderr
            helps[job] = proc.stdout
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", args):
            assert re.search(rf"{re.escape(flag)}\b", helps[job]), f"{job} has no {flag}"
