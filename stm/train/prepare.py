"""What a training run starts from, checked before anything is computed: its data (the
embedded synthetic dataset when none is given; classes, split sizes and the dataset's settings),
its initial weights (ImageNet, the stream runs' checkpoints, or none) and the cluster's room for
it (GPUs, shared storage). Shared by training, sweeps and the whole recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm import home
from stm.config import TrainConfig, UsageError
from stm.data.shards import list_parquet, read_classes, read_dataset_info
from stm.storage import resolve
from stm.train.checkpoint import fetch_run, fetch_uri, load_checkpoint
from stm.train.ingest import split_sizes
from stm.train.runs import storage_root

log = logging.getLogger(__name__)

SYNTHETIC_FLOW = "dis"  # DIS keeps the laptop demo in minutes; real data defaults to TV-L1


@dataclass(frozen=True)
class PreparedData:
    """A run's data, checked: the config with its data path absolute and ``num_classes`` from
    the data, the class names, the split's sizes and the dataset's settings (dataset.json)."""

    cfg: TrainConfig
    classes: list[str]
    num_train: int
    num_test: int
    dataset: dict[str, Any]


def prepare_synthetic(cfg: TrainConfig) -> TrainConfig:
    """Generate and preprocess the synthetic dataset when no data is given (kept for reruns,
    in the home)."""
    from stm.config import PreprocessConfig
    from stm.data.preprocess import run_preprocess

    out = home.synthetic_data()
    if not (out / "classes.json").is_file() or not list(out.glob("shards/*.parquet")):
        log.info("preparing the synthetic dataset in %s (first run only)", out)
        run_preprocess(
            PreprocessConfig(
                source="synthetic",
                root=str(out.parent / "synthetic-videos"),
                out=str(out),
                flow=SYNTHETIC_FLOW,
            )
        )
    return dataclasses.replace(cfg, data=str(out))


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """The run's data: the synthetic dataset when none is given, a local path made absolute
    (trials and workers run in other directories), checked (``validate_data``)."""
    if not cfg.data:
        init_ray()
        cfg = prepare_synthetic(cfg)
    elif "://" not in cfg.data:
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    classes, num_train, num_test = validate_data(cfg)
    if cfg.model.num_classes != len(classes):
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, num_classes=len(classes))
        )
    try:
        dataset = read_dataset_info(cfg.data)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(
            f"--data {cfg.data}: dataset.json: {_one_line(err)} (how the data was preprocessed: "
            f"rerun jobs/preprocess.py --out {cfg.data} with its options)"
        ) from None
    return PreparedData(cfg, classes, num_train, num_test, dataset)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


def validate_data(cfg: TrainConfig) -> tuple[list[str], int, int]:
    """Class names and split sizes; one-line usage errors for data that cannot train."""
    try:
        fs, root = resolve(cfg.data)
        shards = list_parquet(fs, f"{root.rstrip('/')}/shards")
    except FileNotFoundError:
        shards = []
    except (OSError, ValueError) as err:  # unreachable, forbidden, a malformed URI
        raise UsageError(f"--data {cfg.data}: cannot be read: {_one_line(err)}") from None
    if not shards:
        raise UsageError(f"--data {cfg.data}: no shards (run jobs/preprocess.py --out {cfg.data})")
    repair = f"rerun jobs/preprocess.py --out {cfg.data} with its options"
    try:
        classes = read_classes(cfg.data)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("not a list of class names")
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(f"--data {cfg.data}: classes.json: {_one_line(err)} ({repair})") from None
    try:
        num_train, num_test = split_sizes(cfg.data, cfg.split)
    except (OSError, ValueError) as err:  # pyarrow's errors for unreadable shards
        raise UsageError(
            f"--data {cfg.data}: the shards cannot be read: {_one_line(err)}"
        ) from None
    check_manifest(cfg.data, repair)
    if num_train == 0 or num_test == 0:
        raise UsageError(
            f"--split {cfg.split}: the data has {num_train} training and {num_test} test videos"
        )
    if num_train // cfg.num_workers < cfg.bn_batch:
        raise UsageError(
            f"{num_train} training videos are too few for {cfg.num_workers} workers with "
            f"--bn-batch {cfg.bn_batch}"
        )
    return classes, num_train, num_test


def check_manifest(data: str, repair: str) -> None:
    """The shards must hold every video the manifest records as done: a shard that was deleted
    or lost would silently shrink the training set. One line naming what is missing."""
    import pyarrow.compute as pc

    from stm.data.shards import STATUS, STATUS_OK, VIDEO_ID, read_manifest, shards_dataset

    try:
        manifest = read_manifest(data)
        ok = set(manifest.filter(pc.equal(manifest[STATUS], STATUS_OK))[VIDEO_ID].to_pylist())
        held = set(shards_dataset(data).to_table(columns=[VIDEO_ID])[VIDEO_ID].to_pylist())
    except (OSError, ValueError) as err:
        raise UsageError(f"--data {data}: the manifest cannot be read: {_one_line(err)}") from None
    missing = sorted(ok - held)
    if missing:
        raise UsageError(
            f"--data {data}: {len(missing)} of the {len(ok)} videos its manifest records as done "
            f"are in no shard (e.g. {missing[0]}): a shard is missing; {repair} to redo them"
        )


GPU_WAIT_S = 900.0  # how long an autoscaler that can add the GPUs a run needs gets to add them
UNKNOWN = -1.0  # _most_gpus: what the cluster can reach cannot be told


def check_gpus(cfg: TrainConfig, wait_s: float = GPU_WAIT_S) -> None:
    """GPUs the cluster cannot give are one line, never an endless wait: at once on a machine
    or a cluster without an autoscaler, or whose autoscaler cannot reach them; after
    ``wait_s`` when an autoscaler could but has not added them."""
    import ray

    need = cfg.num_workers * cfg.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0.0)
    if need <= have:
        return
    workers, each = cfg.num_workers, cfg.gpus_per_worker
    what = f"--num-workers {workers} x --gpus-per-worker {each:g} need {need:g} GPUs"
    most = _most_gpus()
    if most is None:  # nothing will add GPUs
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = "this machine's Ray" if len(nodes) == 1 else f"this cluster of {len(nodes)} nodes"
        raise UsageError(f"{what}; {where} has {have:g} and no autoscaler to add more")
    if most != UNKNOWN and most < need:
        raise UsageError(f"{what}; this cluster's autoscaler can reach at most {most:g}")
    log.warning("waiting up to %.0f s for %g GPUs: the cluster has %g now", wait_s, need, have)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        have = ray.cluster_resources().get("GPU", 0.0)
        if need <= have:
            return
    raise UsageError(f"{what}; after {wait_s:.0f} s the cluster still has {have:g}")


def _most_gpus() -> float | None:
    """The most GPUs the cluster's autoscaler can reach (its node types' maxima), None when it
    has no autoscaler, ``UNKNOWN`` when Ray does not say (a private API of Ray 2.60, the one
    Ray Train's worker group checks)."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray version: assume an autoscaler may add them
        return UNKNOWN
    return None if most is None else float(most.get("GPU", 0))


def warn_if_not_shared(cfg: TrainConfig, uri: str) -> None:
    """On a multi-node cluster, local paths must be on a filesystem every node shares."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = []
    storage = storage_root(cfg)
    if "://" not in storage:
        local.append(f"--storage-path {storage}")
    if uri.startswith("sqlite:"):
        local.append(f"MLflow store {uri}")
    if local:
        log.warning(
            "%d nodes, but %s %s local: use s3:// or gs:// (and an MLflow server), or a shared "
            "filesystem mounted at the same path on every node",
            len(nodes),
            " and ".join(local),
            "is" if len(local) == 1 else "are",
        )


def initial_state(cfg: TrainConfig, uri: str) -> tuple[dict[str, Any] | None, str]:
    """The run's starting weights and where they come from (the ``init`` tag), by
    ``cfg.resolved_init`` (Sect. 4.1: each stream from ImageNet, the fused model from both):

    - streams: the stream runs' checkpoints (``--appearance-init`` / ``--motion-init``: MLflow
      run ids or checkpoint paths); the fused stage needs both;
    - imagenet: torchvision's ImageNet files (``--imagenet-dir`` or torch's cache), for the
      streams the stage trains; missing files are a usage error;
    - scratch: nothing.
    """
    how = cfg.resolved_init
    if how == "scratch":
        return None, "scratch"
    if how == "imagenet":
        return _imagenet_state(cfg), "ImageNet"
    cfg.check_stream_inits()
    refs = {"appearance": cfg.appearance_init, "motion": cfg.motion_init}
    state: dict[str, Any] = {}
    for stream, ref in refs.items():
        if ref:
            prefixes = (f"{stream}.", f"temporal.{stream}.")
            ckpt = _load_init(
                f"--{stream}-init", ref, _checkpoint_path(f"--{stream}-init", ref, uri)
            )
            state.update({k: v for k, v in ckpt["model"].items() if k.startswith(prefixes)})
    return state, ", ".join(f"{s} from {r}" for s, r in refs.items() if r)


def _load_init(flag: str, ref: str, path: str) -> dict[str, Any]:
    """A stream run's checkpoint (weights only); anything else is a one-line error."""
    try:
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("it holds no model weights")
    except Exception as err:  # noqa: BLE001 - not a checkpoint: torch's many error types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"{flag} {ref}: not an stm checkpoint ({reason})") from None
    return state


def _checkpoint_path(flag: str, ref: str, uri: str) -> str:
    """A local checkpoint for ``ref``: a local path, a file or folder in cloud storage, or the
    best checkpoint of an MLflow run (downloads cached under the home)."""
    if Path(ref).exists():
        return ref
    try:
        if "://" in ref:
            return str(fetch_uri(ref, home.model_cache()))
        return str(fetch_run(uri, ref, home.model_cache()))
    except UsageError as err:
        raise UsageError(f"{flag} {ref}: {err}") from None
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split())[:200]
        raise UsageError(f"{flag} {ref}: no such file or MLflow run in {uri} ({reason})") from None


def _imagenet_state(cfg: TrainConfig) -> dict[str, Any]:
    from stm.model import build_model
    from stm.model.imagenet import load_stream
    from stm.train.steps import streams_of

    model = build_model(cfg.model)
    archs = {"appearance": cfg.model.appearance_arch, "motion": cfg.model.motion_arch}
    try:
        for stream in streams_of(cfg.stage):
            load_stream(model.stream(stream), archs[stream], cfg.imagenet_dir or None)
    except FileNotFoundError as err:
        raise UsageError(f"--init imagenet: {err}; or choose --init scratch") from None
    keep = tuple(f"{s}." for s in streams_of(cfg.stage))
    return {k: v for k, v in model.state_dict().items() if k.startswith(keep)}


def init_ray() -> None:
    """A local instance (with the dashboard: Train's placement-group cleaner and the State API
    use it), or the cluster of ``ray job submit`` / ``RAY_ADDRESS`` / ``ray start``."""
    import ray

    if not ray.is_initialized():
        ray.init()
