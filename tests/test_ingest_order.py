"""The training data order is reproducible: epoch e's data on rank r of w is a function of
(seed, e, r, w) (stm.train.ingest). The deal of the videos to the ranks in plain Python; each
rank's epoch Dataset on a real local Ray over real Parquet shards (the benchmarks' generator)."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stm.config import TrainConfig
from stm.data.clips import TrainClipSampler, train_clip_spec
from stm.data.shards import SHARDS_DIR, VIDEO_ID, resolve, write_table_atomic
from stm.train.ingest import (
    build_datasets,
    data_config,
    deal,
    epoch_dataset,
    epoch_files,
    local_shuffle_seed,
    train_inputs,
)
from stm.train.loop import fixed_steps, micro_batches_per_epoch, train_batches

from tiny import TINY  # tests/tiny.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_data import shard_table  # noqa: E402  (benchmarks/bench_data.py)

VIDEOS, PER_FILE = 26, 4  # 7 shard files; 13 videos per rank of 2, 8 per rank of 3
IDS = [f"syn/v{i:03d}" for i in range(VIDEOS)]  # shard_table's video ids


def test_every_rank_gets_an_equal_disjoint_share_dealt_anew_each_epoch() -> None:
    for world in (1, 2, 3, 4, 7):
        parts = deal(IDS, 0, 1, world)
        union = set().union(*parts)
        assert [len(p) for p in parts] == [VIDEOS // world] * world
        assert sum(len(p) for p in parts) == len(union)  # disjoint
        assert union <= set(IDS) and len(set(IDS) - union) == VIDEOS % world
    assert deal(IDS, 0, 1, 3) == deal(IDS[::-1], 0, 1, 3)  # a function of the set of ids
    assert deal(IDS, 0, 1, 3) == deal(IDS, 0, 1, 3)
    assert set(deal(IDS, 0, 1, 2)[0]) != set(deal(IDS, 0, 2, 2)[0])  # not a fixed partition
    assert set(deal(IDS, 0, 1, 2)[0]) != set(deal(IDS, 1, 1, 2)[0])  # the seed deals too
    # the remainder sits out one epoch only: other videos in other epochs
    sat_out = {frozenset(set(IDS) - set().union(*deal(IDS, 0, e, 4))) for e in range(1, 11)}
    assert len(sat_out) > 1

    files = [f"shards/part-{i}.parquet" for i in range(7)]
    assert sorted(epoch_files(files, 0, 1)) == files
    assert epoch_files(files, 0, 1) == epoch_files(files[::-1], 0, 1)
    assert epoch_files(files, 0, 1) != epoch_files(files, 0, 2)
    seeds = {local_shuffle_seed(s, e, r) for s in (0, 1) for e in (1, 2) for r in (0, 1)}
    assert len(seeds) == 8 and local_shuffle_seed(0, 1, 0) == local_shuffle_seed(0, 1, 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """26 small videos (labels 0-2, all training videos of split 1) in 7 shard files."""
    out = tmp_path_factory.mktemp("order") / "data"
    table = shard_table(VIDEOS, 10, 48, 32)
    fs, root = resolve(str(out))
    for i in range(0, VIDEOS, PER_FILE):
        write_table_atomic(
            fs, f"{root}/{SHARDS_DIR}/part-{i:03d}.parquet", table.slice(i, PER_FILE)
        )
    return str(out)


def small_config(data: str, **kw) -> TrainConfig:
    return TrainConfig(
        data=data,
        model=TINY,
        init="scratch",
        num_chunks=2,
        crop_size=24,
        stride_min=2,
        stride_max=3,
        bn_batch=2,
        batch_size=4,
        num_workers=2,
        **kw,
    )


def _digest(*arrays) -> str:
    return hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def iterate(cfg: TrainConfig, inputs: dict, epoch: int, rank: int, world: int) -> list:
    """(labels, digest of the clips' bytes) of each micro-batch, as the training loop sees them."""
    ds = epoch_dataset(cfg, inputs, epoch, rank, world)
    seed = local_shuffle_seed(cfg.seed, epoch, rank)
    steps = micro_batches_per_epoch(len(inputs["ids"]), world, cfg)
    batches = train_batches(ds, cfg, torch.device("cpu"), shuffle_seed=seed)
    return [
        (b["label"].tolist(), _digest(b["rgb"].numpy(), b["flow"].numpy()))
        for b in fixed_steps(batches, steps, [])
    ]


def test_an_epoch_gives_the_same_clips_in_the_same_order_every_time(ray_local, shards) -> None:
    cfg = small_config(shards)
    inputs = train_inputs(cfg)
    assert inputs["ids"] == IDS and len(inputs["files"]) == 7
    first = iterate(cfg, inputs, 1, 0, 2)
    assert len(first) == (VIDEOS // 2) // cfg.bn_batch  # full micro-batches of the rank's 13
    assert iterate(cfg, inputs, 1, 0, 2) == first  # another execution: the same bytes, in order
    assert iterate(cfg, inputs, 2, 0, 2) != first  # another epoch: other videos, clips, order

    # Rank 1's dataset holds exactly its dealt videos, each with its epoch's clip (computed
    # here without Ray from the same shard rows).
    table = pq.read_table(Path(shards) / SHARDS_DIR)
    ids = deal(inputs["ids"], cfg.seed, 1, 2)[1]
    rows = table.filter(np.isin(table.column(VIDEO_ID).to_numpy(), ids))
    want = TrainClipSampler(train_clip_spec(cfg), epoch=1, seed=cfg.seed)(rows)
    got = epoch_dataset(cfg, inputs, 1, 1, 2).take_all()
    expected = Counter(_digest(want["rgb"][i], want["flow"][i]) for i in range(len(ids)))
    assert len(got) == VIDEOS // 2
    assert Counter(_digest(r["rgb"], r["flow"]) for r in got) == expected


def test_the_driver_passes_only_the_test_set(ray_local, shards) -> None:
    cfg = small_config(shards)
    datasets = build_datasets(cfg)
    assert set(datasets) == {"test"}
    per_worker = data_config().configure(datasets, 2, None, None)
    assert [set(d) for d in per_worker] == [{"test"}, {"test"}]
