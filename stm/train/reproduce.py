"""The paper's whole recipe in one resumable command (``jobs/reproduce.py``).

For each split (Sect. 4-5): the appearance stream alone and the motion stream alone
(concurrently when the cluster has room for both), then the fused multiplier network from
both, then the final test of every stage with the paper's protocol: each stream, their late
fusion (Table 4; on HMDB51 the motion scores weighted by 3) and the fused network (Table 5).
One MLflow parent run holds the recipe and its report; every stage of every split is a child
run (tags ``recipe``, ``split``, ``recipe_stage``), a training run like any other (it logs and
registers its model).

Layout of a recipe ``R`` under the storage path::

    R/recipe.json            the recipe as its first run fixed it (data, splits, stage configs,
                             the parent run): a rerun of the same command continues it
    R/runs/split<k>-<stage>/ each stage's Ray Train run and checkpoints
    R/results/split<k>.json  each split's final test, once done
    R/report/                reproduce_report.md / .png / .json (also in the parent run)

Resuming is by stage: a stage whose MLflow run finished is not run again, one that was
interrupted resumes from its last checkpoint (``run_training(resume=True)``), one that never
started starts. The stages run as Ray tasks (each the driver of its own TorchTrainer), so a
cluster schedules them like any other work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm.config import ReproduceConfig, TrainConfig, UsageError, from_dict, to_dict, with_changes
from stm.config import stage_recipe as paper_stage_recipe
from stm.storage import join, read_text, resolve, write_bytes_atomic, write_text
from stm.train import tracking
from stm.train.prepare import init_ray, prepare_data
from stm.train.runs import has_checkpoint, storage_root

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
RUNS_DIR = "runs"
RESULTS_DIR = "results"
REPORT_DIR = "report"
STREAMS = ("appearance", "motion")
ROWS = ("appearance", "motion", "late_fusion", "fused")  # the report's rows, in order
ROW_NAMES = {
    "appearance": "appearance stream",
    "motion": "motion stream",
    "late_fusion": "late fusion (two-stream)",
    "fused": "fused network (STMulNet)",
}
HMDB_MOTION_WEIGHT = 3.0  # Sect. 5.3: "On HMDB51 we weight the temporal network scores by 3"
# The embedded default's stage lengths (the synthetic data, ResNet-18 streams from scratch).
EMBEDDED_EPOCHS = {"appearance": 8, "motion": 12, "fused": 8}


@dataclass(frozen=True)
class RecipeState:
    """A recipe as its first run fixed it (``R/recipe.json``)."""

    name: str
    data: str
    source: str  # the dataset's source (ucf101, hmdb51, synthetic, ...): the paper's column
    splits: tuple[int, ...]
    configs: Mapping[str, TrainConfig]  # "split<k>/<stage>" -> the stage's config
    parent_run_id: str
    tracking_uri: str
    late_fusion_weight: float
    created: str

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["configs"] = {k: to_dict(c) for k, c in self.configs.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RecipeState:
        data = json.loads(text)
        data["configs"] = {k: from_dict(TrainConfig, c) for k, c in data["configs"].items()}
        data["splits"] = tuple(data["splits"])
        return cls(**data)

    def config(self, split: int, stage: str) -> TrainConfig:
        return self.configs[stage_key(split, stage)]


@dataclass(frozen=True)
class RecipeSummary:
    name: str
    parent_run_id: str
    tracking_uri: str
    recipe_dir: str
    results: dict[int, dict[str, float]]  # split -> row -> accuracy
    report: str  # the Markdown table
    registered: str  # "NAME version N (alias ALIAS)" of the best split's fused model, or ""
    seconds: float
    ran: list[str]  # the stages this command ran or resumed ("split1/fused", ...)


def stage_key(split: int, stage: str) -> str:
    return f"split{split}/{stage}"


def stage_configs(
    preset: TrainConfig, flags: Mapping[str, Any], splits: Sequence[int], real_data: bool
) -> dict[str, TrainConfig]:
    """Every stage's config of every split: the paper's recipe of the stage (on real data;
    the stream stages' structure and short runs on the embedded default) under the flags the
    user gave. The fused stage's stream inits are set when the stream runs exist."""
    configs = {}
    for split in splits:
        for stage in (*STREAMS, "fused"):
            recipe = paper_stage_recipe(stage, real_data, flags.get("num_workers", 1))
            if not real_data:
                recipe = {**recipe, "epochs": EMBEDDED_EPOCHS[stage], "init": "scratch"}
            changes = {**recipe, **flags, "split": split, "name": f"split{split}-{stage}"}
            if stage == "fused":  # "streams", from the stream runs: set by run_stage
                changes["init"] = "scratch"
            configs[stage_key(split, stage)] = with_changes(preset, changes)
    return configs


# --- running -------------------------------------------------------------------------------------
def run_recipe(
    preset: TrainConfig, flags: Mapping[str, Any], recipe: ReproduceConfig
) -> RecipeSummary:
    """Run the recipe, or continue it where it stopped; usage errors raise ``UsageError``.

    Args:
        preset: the training defaults (the paper's, or the embedded default's without data).
        flags: the training flags the user gave explicitly (they override every stage's recipe).
        recipe: the splits, the recipe's name and how to run it.
    """
    started = time.time()
    uri = tracking.resolve_uri(flags.get("mlflow_uri") or preset.mlflow_uri)
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        raise UsageError(str(err)) from None
    if recipe.root:
        _preprocess(recipe, flags.get("data", ""))
    # the data, checked as the first stage sees it (the synthetic dataset when none is given)
    real = bool(flags.get("data"))
    first = paper_stage_recipe("appearance", real, flags.get("num_workers", 1))
    data = prepare_data(with_changes(preset, {**first, **flags, "mlflow_uri": uri}))
    base = with_changes(preset, {**flags, "data": data.cfg.data, "init": "scratch"})
    state = _load_or_start(preset, base, flags, recipe, data.dataset, uri)
    init_ray()
    recipe_dir = join(storage_root(base), state.name)
    tracking.close_orphans(uri, base.experiment)  # e.g. this recipe's, if its driver was killed
    tracking.resume_run(uri, state.parent_run_id)
    log.info("recipe %s: splits %s; MLflow parent run %s", state.name, state.splits, uri)
    ran: list[str] = []
    try:
        results = {}
        for split in state.splits:
            ran += _train_split(state, recipe_dir, split, recipe.concurrent_streams)
            results[split] = _final_test(state, recipe_dir, split)
        report = publish_report(state, results, recipe_dir)
        registered = register_best_split(state, recipe_dir, results)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt | SystemExit):
            tracking.fail_run(uri, state.parent_run_id, err)
        raise
    tracking.end_run(uri, state.parent_run_id)
    return RecipeSummary(
        name=state.name,
        parent_run_id=state.parent_run_id,
        tracking_uri=uri,
        recipe_dir=recipe_dir,
        results=results,
        report=report,
        registered=registered,
        seconds=time.time() - started,
        ran=ran,
    )


def _preprocess(recipe: ReproduceConfig, out: str) -> None:
    """``--root``: the videos into ``--data`` first (resumable: done videos are skipped)."""
    from stm.config import PreprocessConfig
    from stm.data.preprocess import run_preprocess

    if not out:
        raise UsageError("--root needs --data: where the preprocessed shards go")
    run_preprocess(
        PreprocessConfig(
            source=recipe.source, root=recipe.root, splits=recipe.split_files or None, out=out
        )
    )


def _load_or_start(
    preset: TrainConfig,
    base: TrainConfig,
    flags: Mapping[str, Any],
    recipe: ReproduceConfig,
    dataset: Mapping[str, Any],
    uri: str,
) -> RecipeState:
    """The recipe of this name under the storage path (the same command continues it), or a
    new one: its stage configs, its MLflow parent run and its ``recipe.json``."""
    from stm.train.registry import dataset_key

    name = recipe.name or f"reproduce-{dataset_key(base.data)}"
    recipe_dir = join(storage_root(base), name)
    text = read_text(join(recipe_dir, RECIPE_FILE))
    if text:
        state = RecipeState.from_json(text)
        if state.data != base.data:
            raise UsageError(
                f"recipe {name} (under {storage_root(base)}) ran on {state.data}, not "
                f"{base.data}: give another --name"
            )
        log.info("continuing recipe %s (%s)", name, recipe_dir)
        return state
    source = str(dataset.get("source", "data"))
    num_splits = int(dataset.get("num_splits") or 1)
    splits = recipe.splits or tuple(range(1, min(num_splits, 3) + 1))
    if max(splits) > num_splits:
        raise UsageError(f"--splits {','.join(map(str, splits))}: {base.data} has {num_splits}")
    real = source != "synthetic"
    runs = join(recipe_dir, RUNS_DIR)
    flags = {**flags, "data": base.data, "storage_path": runs, "mlflow_uri": uri}
    configs = stage_configs(preset, flags, splits, real)
    weight = recipe.late_fusion_weight
    if weight is None:
        weight = HMDB_MOTION_WEIGHT if source == "hmdb51" else 1.0
    parent = tracking.start_parent_run(
        uri,
        base.experiment,
        "recipe",
        name,
        {"recipe": to_dict(recipe), "base": to_dict(base)},
        {"dataset": dataset_key(base.data), "storage": recipe_dir},
        description=f"stm: the paper's recipe on {base.data}, splits "
        f"{', '.join(map(str, splits))} (appearance, motion, fused; final test of each)",
    )
    state = RecipeState(
        name=name,
        data=base.data,
        source=source,
        splits=tuple(splits),
        configs=configs,
        parent_run_id=parent,
        tracking_uri=uri,
        late_fusion_weight=float(weight),
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    write_text(join(recipe_dir, RECIPE_FILE), state.to_json())
    return state


def _run_id(cfg: TrainConfig) -> str:
    return (read_text(join(cfg.storage_path, cfg.name, tracking.RUN_ID_FILE)) or "").strip()


def stage_status(state: RecipeState, split: int, stage: str) -> str:
    """``done`` (its run finished and holds its model), ``interrupted`` (its run has a
    checkpoint to resume from) or ``new``."""
    cfg = state.config(split, stage)
    run_id = _run_id(cfg)
    if not run_id or not has_checkpoint(join(cfg.storage_path, cfg.name)):
        return "new"  # a run that died before its first checkpoint starts again
    client = tracking.mlflow_client(state.tracking_uri)
    run = client.get_run(run_id)
    if run.info.status == "FINISHED" and any(
        a.path == "model" for a in client.list_artifacts(run_id)
    ):
        return "done"
    return "interrupted"


def _train_split(
    state: RecipeState, recipe_dir: str, split: int, concurrent: bool | None
) -> list[str]:
    """The split's stream stages (concurrently when there is room), then its fused stage from
    both; returns the stages run or resumed."""
    import ray

    todo = [s for s in STREAMS if stage_status(state, split, s) != "done"]
    if concurrent is None:
        concurrent = _room_for(state.config(split, "appearance"), len(todo))
    ran = []
    if concurrent and len(todo) > 1:
        ray.get([_stage_task(state, recipe_dir, split, s) for s in todo])
        ran += [stage_key(split, s) for s in todo]
    else:
        for stage in todo:
            ray.get(_stage_task(state, recipe_dir, split, stage))
            ran.append(stage_key(split, stage))
    if stage_status(state, split, "fused") != "done":
        ray.get(_stage_task(state, recipe_dir, split, "fused"))
        ran.append(stage_key(split, "fused"))
    return ran


def _room_for(cfg: TrainConfig, stages: int) -> bool:
    """Whether the cluster holds ``stages`` such training runs at once with a CPU to spare
    for their input pipelines (the nodes up now; an autoscaler may add more later)."""
    import ray

    total = ray.cluster_resources()
    cpus = stages * cfg.num_workers * cfg.cpus_per_worker + 1
    gpus = stages * cfg.num_workers * cfg.gpus_per_worker
    return total.get("CPU", 0) >= cpus and total.get("GPU", 0) >= gpus


def _stage_task(state: RecipeState, recipe_dir: str, split: int, stage: str):
    """One stage as a Ray task (the driver of its TorchTrainer; it holds no resources)."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(run_stage)
    return task.options(name=f"{state.name}:{stage_key(split, stage)}").remote(
        recipe_dir, split, stage
    )


def run_stage(recipe_dir: str, split: int, stage: str) -> str:
    """Train (or resume) one stage of the recipe in ``recipe_dir``; returns its run id."""
    from stm.train.run import run_training

    state = RecipeState.from_json(read_text(join(recipe_dir, RECIPE_FILE)) or "")
    cfg = state.config(split, stage)
    if stage == "fused":  # from both stream runs of this split (MLflow run ids)
        inits = {f"{s}_init": _run_id(state.config(split, s)) for s in STREAMS}
        cfg = dataclasses.replace(cfg, init="streams", **inits)
    resume = bool(_run_id(cfg)) and has_checkpoint(join(cfg.storage_path, cfg.name))
    tags = {"recipe": state.name, "split": str(split), "recipe_stage": stage}
    summary = run_training(cfg, resume=resume, parent_run_id=state.parent_run_id, tags=tags)
    return summary.run_id


# --- the final test ------------------------------------------------------------------------------
def _final_test(state: RecipeState, recipe_dir: str, split: int) -> dict[str, float]:
    """The split's final test (kept in ``R/results``): each stream and their late fusion from
    the two stream models, the fused network from its own."""
    import ray

    path = join(recipe_dir, RESULTS_DIR, f"split{split}.json")
    text = read_text(path)
    if text:
        return json.loads(text)
    cfg = state.config(split, "fused")
    gpus = 1 if cfg.gpus_per_worker > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(test_split)
    run_ids = {s: _run_id(state.config(split, s)) for s in (*STREAMS, "fused")}
    result = ray.get(
        task.remote(state.tracking_uri, state.data, split, run_ids, state.late_fusion_weight)
    )
    write_text(path, json.dumps(result, indent=1))
    client = tracking.mlflow_client(state.tracking_uri)
    for row, acc in result.items():
        if isinstance(acc, float):
            client.log_metric(state.parent_run_id, f"split{split}_{row}_acc", acc)
    return result


def test_split(
    uri: str, data: str, split: int, run_ids: Mapping[str, str], motion_weight: float
) -> dict[str, Any]:
    """The paper's test of one split: {"appearance", "motion", "late_fusion", "fused": video
    accuracy, "videos": test videos}."""
    from stm.train.predict import evaluate_split, load_model_dir
    from stm.train.registry import fetch_model

    def load(stage: str):
        folder, source = fetch_model(uri, run_id=run_ids[stage])
        return load_model_dir(folder, source)

    late = late_fusion_model(load("appearance"), load("motion"), motion_weight)
    two_stream = evaluate_split(late, data, split)
    fused = evaluate_split(load("fused"), data, split)
    return {
        "appearance": two_stream.accuracy["appearance"],
        "motion": two_stream.accuracy["motion"],
        "late_fusion": two_stream.accuracy["fused"],
        "fused": fused.accuracy["fused"],
        "videos": two_stream.videos,
    }


def late_fusion_model(appearance: Any, motion: Any, motion_weight: float = 1.0) -> Any:
    """The two-stream baseline of Table 4: the appearance run's stream and the motion run's
    stream side by side, unconnected (no gates, no temporal filters), scored like the paper
    ("averaging the prediction layer outputs", the motion stream weighted by ``motion_weight``)
    with each stream run's own test protocol. Its "fused" accuracy is the late fusion."""
    from stm.model import build_model
    from stm.train.predict import LoadedModel

    a, m = appearance.cfg, motion.cfg
    model_cfg = dataclasses.replace(
        a.model,
        motion_arch=m.model.motion_arch,
        motion_dropout=m.model.motion_dropout,
        flow_length=m.model.flow_length,
        fusion="none",
        temporal="none",
    )
    cfg = dataclasses.replace(a, model=model_cfg, stage="fused", motion_weight=motion_weight)
    model = build_model(model_cfg)
    state = {k: v for k, v in appearance.model.state_dict().items() if k.startswith("appearance.")}
    state.update({k: v for k, v in motion.model.state_dict().items() if k.startswith("motion.")})
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model, cfg, appearance.class_names, appearance.preprocessing, "late fusion")


# --- the report and the best model ---------------------------------------------------------------
def paper_numbers(state: RecipeState) -> dict[str, float | None]:
    """The paper's accuracy (%) for each row on this dataset: Table 4 for the streams and their
    late fusion at the matching depths (late fusion only where both streams have one depth),
    Table 5 for the fused network (ResNet-50 + ResNet-152); None where none applies."""
    from stm.train.report import paper_results

    out: dict[str, float | None] = dict.fromkeys(ROWS)
    if state.source not in ("ucf101", "hmdb51"):
        return out
    tables = paper_results()["tables"]
    t4 = {r["key"]: r for r in tables["table4"]["rows"]}
    fused = state.config(state.splits[0], "fused").model
    archs = {"appearance": fused.appearance_arch, "motion": fused.motion_arch}
    a = state.config(state.splits[0], "appearance").model.appearance_arch
    m = state.config(state.splits[0], "motion").model.motion_arch
    for row, arch in (("appearance", a), ("motion", m)):
        out[row] = t4[row].get(arch, {}).get(state.source)
    if a == m:
        out["late_fusion"] = t4["late_fusion"].get(a, {}).get(state.source)
    if archs == {"appearance": "resnet50", "motion": "resnet152"}:
        t5 = {r["key"]: r for r in tables["table5"]["rows"]}
        out["fused"] = t5["stmulnet"][state.source]
    return out


def report_table(state: RecipeState, results: Mapping[int, Mapping[str, float]]) -> str:
    """The Markdown report: per split and the mean over splits, beside the paper's."""
    paper = paper_numbers(state)
    splits = sorted(results)
    head = ["", *(f"split {k}" for k in splits), "mean", "paper"]
    lines = [
        f"**Recipe {state.name}**: {state.data} ({state.source}), video accuracy (%) with the "
        f"paper's test protocol ({state.config(splits[0], 'fused').test_frames} frames and their "
        "flips, whole frames).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in ROWS:
        values = [100 * results[k][row] for k in splits]
        mean = sum(values) / len(values)
        ref = paper[row]
        cells = [ROW_NAMES[row], *(f"{v:.1f}" for v in values), f"{mean:.1f}"]
        cells.append(f"{ref:.1f}" if ref is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if state.source in ("ucf101", "hmdb51"):
        lines.append(
            "Paper: Table 4 (two-stream baselines at the streams' depths, means over three "
            "splits) and Table 5 (the fused network, ResNet-50 + ResNet-152, mean over three "
            "splits, without IDT)."
            + (
                f" Late fusion weights the motion stream by {state.late_fusion_weight:g}."
                if state.late_fusion_weight != 1
                else ""
            )
        )
    else:
        lines.append(
            f"The paper's numbers do not apply to {state.source} data (they are UCF101's and "
            "HMDB51's); this run shows the recipe's machinery."
        )
    return "\n".join(lines) + "\n"


def report_plot(state: RecipeState, results: Mapping[int, Mapping[str, float]], path: str) -> None:
    """Bars per row: each split's accuracy and the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paper = paper_numbers(state)
    splits = sorted(results)
    y = np.arange(len(ROWS))
    groups = len(splits) + 1
    h = 0.8 / groups
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.8 * len(ROWS)))
    for i, k in enumerate(splits):
        ax.barh(y - 0.4 + (i + 0.5) * h, [100 * results[k][r] for r in ROWS], h, label=f"split {k}")
    ref = [paper[r] if paper[r] is not None else math.nan for r in ROWS]
    ax.barh(y - 0.4 + (groups - 0.5) * h, ref, h, label="paper", color="tab:gray")
    ax.set_yticks(y, [ROW_NAMES[r] for r in ROWS], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("video accuracy (%), higher is better")
    ax.set_xlim(0, 100)
    ax.set_title(f"recipe {state.name}: {state.source}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish_report(
    state: RecipeState, results: Mapping[int, Mapping[str, float]], recipe_dir: str
) -> str:
    """The report's files in ``R/report`` and the parent run; returns the Markdown."""
    text = report_table(state, results)
    client = tracking.mlflow_client(state.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="stm-report-") as tmp:
        Path(tmp, "reproduce_report.md").write_text(text)
        report_plot(state, results, str(Path(tmp, "reproduce_report.png")))
        payload = {
            "recipe": state.name,
            "data": state.data,
            "source": state.source,
            "parent_run_id": state.parent_run_id,
            "results": {str(k): v for k, v in results.items()},
            "paper": paper_numbers(state),
        }
        Path(tmp, "reproduce_report.json").write_text(json.dumps(payload, indent=1))
        for name in os.listdir(tmp):
            fs, path = resolve(join(recipe_dir, REPORT_DIR, name))
            write_bytes_atomic(fs, path, Path(tmp, name).read_bytes())
        client.log_artifacts(state.parent_run_id, tmp)
    for row in ROWS:
        mean = sum(results[k][row] for k in results) / len(results)
        client.log_metric(state.parent_run_id, f"mean_{row}_acc", mean)
    return text


def register_best_split(
    state: RecipeState, recipe_dir: str, results: Mapping[int, Mapping[str, float]]
) -> str:
    """Point ``best-<dataset>`` at the fused model of the split with the best fused accuracy
    (its run registered it as a version when it finished); returns a description or ""."""
    from stm.train.registry import BEST, dataset_key

    best = max(results, key=lambda k: results[k]["fused"])
    run_id = _run_id(state.config(best, "fused"))
    client = tracking.mlflow_client(state.tracking_uri)
    registered = client.get_run(run_id).data.tags.get("registered_model", "")
    if not registered:
        return ""
    name, version = registered.split("/")
    alias = f"{BEST}-{dataset_key(state.data)}"
    client.set_registered_model_alias(name, alias, version)
    client.set_tag(state.parent_run_id, "best_split", str(best))
    client.set_tag(state.parent_run_id, "registered_model", registered)
    return f"{name} version {version} (alias {alias}; split {best})"
