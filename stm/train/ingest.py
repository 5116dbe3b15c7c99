"""The input pipelines on Ray Data: shards are streamed from Parquet, the split selected, and
clips sampled in Ray Data workers. With ``decode="cpu"`` the workers also decode and augment them;
with ``decode="device"`` they ship the clips' JPEGs and the training loop decodes them on its
device (:mod:`stm.data.device_clips`). Test views are always decoded in the workers.

The test set is one dataset, built on the driver and split unequally (:func:`data_config`): every
test video is scored once. The training data of epoch e on rank r of w is a pure function of
(``cfg.seed``, e, r, w), so that the same seed, data and worker count give the same run, and a
restarted or resumed run the same epoch-e data. Each worker builds it (:func:`epoch_dataset`) from
:func:`train_inputs`, which the driver reads once (the shard files and the split's training video
ids):

- the videos: a permutation of the ids seeded by (seed, e), dealt to the ranks so that each gets
  ``num_train // w`` of them (DDP needs equal micro-batch counts); the remainder sits out epoch e
  only (:func:`deal`);
- the shard files, read in an order seeded by (seed, e) (:func:`epoch_files`), filtered to the
  rank's ids in the Parquet scan, before any decoding; Ray Data keeps the order of the rows
  (``preserve_order``);
- each video's augmentation from ``video_seed(seed, e, video_id)`` (:mod:`stm.data.clips`);
- the worker's local shuffle buffer, seeded by (seed, e, r) (:func:`local_shuffle_seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stm.config import TrainConfig
from stm.data.clips import TestClipSampler, TrainClipSampler, test_clip_spec, train_clip_spec
from stm.data.device_clips import TrainPlanSampler
from stm.data.shards import (
    CHECKSUMS,
    FLOW_U,
    FLOW_V,
    HEIGHT,
    LABEL,
    NUM_FRAMES,
    RGB,
    TEST_SPLITS,
    TRAIN_SPLITS,
    VIDEO_ID,
    WIDTH,
    in_split,
    list_parquet,
    resolve,
    shards_dataset,
)

CLIP_COLUMNS = [
    VIDEO_ID,
    LABEL,
    NUM_FRAMES,
    HEIGHT,
    WIDTH,
    RGB,
    FLOW_U,
    FLOW_V,
    TRAIN_SPLITS,
    TEST_SPLITS,
]


def clip_columns(data: str, files: Sequence[str]) -> list[str]:
    """The shard columns clips are sampled from: ``CLIP_COLUMNS`` and the JPEG checksums, when
    the dataset's shards carry them (they do from the first shard on, or not at all)."""
    if not files:
        return list(CLIP_COLUMNS)
    import pyarrow.parquet as pq

    fs, _ = resolve(data)
    names = set(pq.read_schema(files[0], filesystem=fs).names)
    return [*CLIP_COLUMNS, *(c for c in CHECKSUMS.values() if c in names)]


def split_sizes(data: str, split: int) -> tuple[int, int]:
    """(training videos, test videos) of ``split``, from two small columns of the shards."""
    table = shards_dataset(data).to_table(columns=[TRAIN_SPLITS, TEST_SPLITS])
    return int(in_split(table, split, True).sum()), int(in_split(table, split, False).sum())


def _clips(batch: pa.Table, *, split: int, train: bool, sampler: Any) -> Any:
    """Keep the split's videos of a batch of shard rows, then sample their clips."""
    out = sampler(batch.filter(in_split(batch, split, train)))
    if isinstance(out, dict) and len(out.get("label", ())) == 0:
        return empty_tensor_table(out)
    return out


def empty_tensor_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Zero rows of clip arrays as the Arrow table Ray Data would make of non-empty ones (its
    tensor extension type per multi-dimensional column). Ray converts an empty (0, ...) array
    only by pickling it, with a warning every time a batch holds none of the split's videos."""
    from ray.data.extensions import ArrowTensorTypeV2

    table = {}
    for name, values in columns.items():
        if values.ndim == 1:
            table[name] = pa.array(values)
        else:
            kind = ArrowTensorTypeV2(values.shape[1:], pa.from_numpy_dtype(values.dtype))
            table[name] = pa.ExtensionArray.from_storage(kind, pa.array([], kind.storage_type))
    return pa.table(table)


# The purposes of the per-epoch random streams (the spawn keys of their seed sequences).
_DEAL, _FILE_ORDER, _LOCAL_SHUFFLE = 1, 2, 3


def _seed_sequence(purpose: int, *entropy: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(e) for e in entropy], spawn_key=(purpose,))


def train_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What every worker needs to build its epochs' training data, read once on the driver:
    {"data": the data URI (each worker resolves its filesystem), "files": the shard files,
    "ids": the split's training video ids, sorted}. Small and picklable (a train loop config
    value); one snapshot of the shards for every worker and every epoch."""
    dataset = shards_dataset(cfg.data)
    table = dataset.to_table(columns=[VIDEO_ID, TRAIN_SPLITS])
    ids = table.column(VIDEO_ID).filter(pa.array(in_split(table, cfg.split, True))).to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.data}: the shards hold some training video twice")
    files = sorted(dataset.files)
    return {
        "data": cfg.data,
        "files": files,
        "ids": sorted(ids),
        "columns": clip_columns(cfg.data, files),
    }


def deal(ids: Sequence[str], seed: int, epoch: int, world: int) -> list[list[str]]:
    """The training videos of each of ``world`` ranks in ``epoch``: a permutation of ``ids``
    seeded by (seed, epoch), cut into ``world`` parts of ``len(ids) // world``; the remainder
    sits out this epoch only. A function of the set of ids (they are sorted first)."""
    ids = sorted(ids)
    n = len(ids) // world
    order = np.random.default_rng(_seed_sequence(_DEAL, seed, epoch)).permutation(len(ids))
    return [[ids[i] for i in order[r * n : (r + 1) * n]] for r in range(world)]


def epoch_files(files: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard files in the order epoch ``epoch`` reads them, seeded by (seed, epoch)."""
    files = sorted(files)
    order = np.random.default_rng(_seed_sequence(_FILE_ORDER, seed, epoch)).permutation(len(files))
    return [files[i] for i in order]


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s local shuffle buffer in ``epoch``."""
    return int(_seed_sequence(_LOCAL_SHUFFLE, seed, epoch, rank).generate_state(1)[0])


def epoch_ids(cfg: TrainConfig, inputs: dict[str, Any], epoch: int, rank: int, world: int):
    """The training video ids of rank ``rank`` in ``epoch`` (:func:`deal`)."""
    return deal(inputs["ids"], cfg.seed, epoch, world)[rank]


def epoch_dataset(
    cfg: TrainConfig, inputs: dict[str, Any], epoch: int, rank: int, world: int
) -> Any:
    """Rank ``rank``'s training clips of ``epoch`` (1-based) as a lazy Ray Dataset, in a
    deterministic order: its videos (:func:`deal`) read from the shard files in the epoch's
    order (:func:`epoch_files`), filtered in the Parquet scan, and sampled with the epoch's
    seeds. ``inputs``: :func:`train_inputs`. Built inside the Ray Train worker, every epoch."""
    import ray.data
    from ray.data.expressions import col

    fs, _ = resolve(inputs["data"])
    ids = epoch_ids(cfg, inputs, epoch, rank, world)
    # --decode device: the workers only sample the clips and ship their JPEGs, which the
    # training loop decodes on its device (stm.data.device_clips); the same random draws.
    sampler_cls = TrainPlanSampler if cfg.decode == "device" else TrainClipSampler
    sampler = sampler_cls(train_clip_spec(cfg), epoch=epoch, seed=cfg.seed)
    ds = (
        ray.data.read_parquet(epoch_files(inputs["files"], cfg.seed, epoch), filesystem=fs)
        .select_columns(inputs.get("columns") or CLIP_COLUMNS)
        .filter(expr=col(VIDEO_ID).is_in(ids))  # pushed into the scan: only these row groups
        .map_batches(
            _clips,
            batch_format="pyarrow",
            batch_size=cfg.bn_batch,
            fn_kwargs={"split": cfg.split, "train": True, "sampler": sampler},
        )
    )
    # the rows in the order of the files and their row groups, not in the order tasks finish
    ds.context.execution_options.preserve_order = True
    # every worker runs one per epoch: no progress bars of its own (blank lines in the log)
    ds.context.enable_progress_bars = False
    return ds


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """{"test": test views} as a lazy Ray Dataset (the driver's; each worker builds its
    training data itself, :func:`epoch_dataset`)."""
    import ray.data

    fs, root = resolve(cfg.data)
    files = list_parquet(fs, f"{root.rstrip('/')}/shards")
    columns = clip_columns(cfg.data, files)
    base = ray.data.read_parquet(files, filesystem=fs).select_columns(columns)
    test_sampler = TestClipSampler(test_clip_spec(cfg))
    test = base.map_batches(
        _clips,
        batch_format="pyarrow",
        batch_size=1,  # full frames of different videos may differ in size
        fn_kwargs={"split": cfg.split, "train": False, "sampler": test_sampler},
    )
    return {"test": test}


def data_config():
    """Train's DataConfig, but the test set is split unequally: every test video is scored
    exactly once (an equal split would drop up to world_size - 1 of them). The driver passes
    no training dataset (each worker builds its own, :func:`epoch_dataset`); any other dataset
    is split equally as Train's default does."""
    from ray.train import DataConfig

    class EvalDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = super().configure(
                {k: v for k, v in datasets.items() if k != "test"},
                world_size,
                worker_handles,
                worker_node_ids,
                **kwargs,
            )
            if "test" in datasets:
                ds = datasets["test"].copy(datasets["test"])
                ds.context.execution_options = self._resolve_execution_options("test")
                hints = worker_node_ids if self._enable_shard_locality else None
                splits = ds.streaming_split(world_size, equal=False, locality_hints=hints)
                for i, split in enumerate(splits):
                    output[i]["test"] = split
            return output

    return EvalDataConfig()
