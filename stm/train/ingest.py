"""The training input pipeline on Ray Data, built on the driver: shards are streamed from
Parquet, the split selected, and clips sampled in Ray Data workers. With ``decode="cpu"`` the
workers also decode and augment them; with ``decode="device"`` they ship the clips' JPEGs and
the training loop decodes them on its device (:mod:`stm.data.device_clips`). Test views are
always decoded in the workers. Each epoch re-executes the pipeline, so augmentation is drawn anew
per epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from stm.config import TrainConfig
from stm.data.clips import TestClipSampler, TrainClipSampler, test_clip_spec, train_clip_spec
from stm.data.device_clips import TrainPlanSampler
from stm.data.shards import (
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


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """{"train": training clips, "test": test views} as lazy Ray Datasets."""
    import ray.data

    fs, root = resolve(cfg.data)
    files = list_parquet(fs, f"{root.rstrip('/')}/shards")
    base = ray.data.read_parquet(files, filesystem=fs).select_columns(CLIP_COLUMNS)
    # --decode device: the workers only sample the clips and ship their JPEGs, which the
    # training loop decodes on its device (stm.data.device_clips); the same random draws.
    sampler_cls = TrainPlanSampler if cfg.decode == "device" else TrainClipSampler
    # seed=None: fresh randomness on every execution, i.e. every epoch
    train_sampler = sampler_cls(train_clip_spec(cfg), seed=None)
    test_sampler = TestClipSampler(test_clip_spec(cfg))
    train = base.randomize_block_order().map_batches(
        _clips,
        batch_format="pyarrow",
        batch_size=cfg.bn_batch,
        fn_kwargs={"split": cfg.split, "train": True, "sampler": train_sampler},
    )
    test = base.map_batches(
        _clips,
        batch_format="pyarrow",
        batch_size=1,  # full frames of different videos may differ in size
        fn_kwargs={"split": cfg.split, "train": False, "sampler": test_sampler},
    )
    return {"train": train, "test": test}


def data_config():
    """Train's DataConfig, but the test set is split unequally: every test video is scored
    exactly once (an equal split would drop up to world_size - 1 of them)."""
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
