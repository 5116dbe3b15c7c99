"""How random is the training order? Classes per BatchNorm batch and per update, through the
job's own path, on a many-class dataset, beside the same for a uniformly random order.

The dataset is laid out as ``jobs/preprocess.py`` lays it out: the listing sorted by class (as
every source lists it), put in shard order (``stm.data.preprocess.shard_order``) and cut into
shards of ``--videos-per-shard``; the videos are tiny (the order, not the pixels, is measured).
The epochs then run through ``stm.train.ingest.epoch_dataset`` and
``stm.train.loop.train_batches`` on a local Ray, as a training worker sees them. For comparison,
the same counts for one shard per class (the order before shard_order), and the expected
number of distinct classes in ``n`` uniform draws from ``K`` classes, ``K (1 - (1 - 1/K)^n)``.

    python benchmarks/data_order.py                     # 101 classes x 8 videos, 2 epochs
    python benchmarks/data_order.py --classes 51 --videos-per-class 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.config import embedded_default  # noqa: E402
from stm.data.preprocess import shard_order  # noqa: E402
from stm.data.sources import VideoItem  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import order_shards  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", type=int, default=101, help="K (UCF101: 101)")
    p.add_argument("--videos-per-class", type=int, default=8)
    p.add_argument("--videos-per-shard", type=int, default=8, help="as jobs/preprocess.py")
    p.add_argument("--bn-batch", type=int, default=4, help="videos per forward (the paper's 4)")
    p.add_argument("--batch-size", type=int, default=128, help="videos per update")
    p.add_argument("--epochs", type=int, default=2)
    return p.parse_args(argv)


def expected_distinct(k: int, n: int) -> float:
    """Distinct classes among ``n`` uniform draws from ``k`` equally likely classes."""
    return k * (1.0 - (1.0 - 1.0 / k) ** n)


def permutation_distinct(labels: list[int], args: argparse.Namespace) -> tuple[float, float]:
    """Mean distinct classes per BN batch and per update of random permutations of ``labels``
    (every video once per epoch, as the original's randperm)."""
    rng = np.random.default_rng(0)
    bn, update = [], []
    for _ in range(200):
        order = rng.permutation(labels)
        bn += [len(set(order[i : i + args.bn_batch])) for i in range(0, len(order), args.bn_batch)]
        step = args.batch_size
        update += [len(set(order[i : i + step])) for i in range(0, len(order) - step + 1, step)]
    return float(np.mean(bn)), float(np.mean(update))


def measure(data: str, args: argparse.Namespace, k: int, buffer: bool) -> tuple[float, float]:
    """Mean distinct classes per BN batch and per update over the epochs, as the one worker
    sees them (``buffer``), or in the pipeline's own order, before the worker's local shuffle
    buffer: its worst case, when the training step consumes batches as fast as they come (the
    buffer then holds little more than its minimum)."""
    import torch

    from stm.train.ingest import epoch_dataset, local_shuffle_seed, train_inputs
    from stm.train.loop import train_batches

    cfg = embedded_default(
        data=data,
        model={"num_classes": k},
        num_workers=1,
        batch_size=args.batch_size,
        bn_batch=args.bn_batch,
        num_chunks=1,
        crop_size=16,
    )
    per_bn, per_update = [], []
    inputs = train_inputs(cfg)
    for epoch in range(1, args.epochs + 1):
        train = epoch_dataset(cfg, inputs, epoch, 0, 1)  # the one worker's epoch, as the loop's
        if buffer:
            seed = local_shuffle_seed(cfg.seed, epoch, 0)
            batches = train_batches(train, cfg, torch.device("cpu"), shuffle_seed=seed)
        else:
            batches = train.iter_batches(batch_size=cfg.bn_batch, batch_format="numpy")
        labels = [np.asarray(b["label"]).tolist() for b in batches]
        per_bn += [len(set(b)) for b in labels]
        steps = cfg.accum_steps
        for u in range(0, len(labels) - steps + 1, steps):
            per_update.append(len({c for b in labels[u : u + steps] for c in b}))
    return float(np.mean(per_bn)), float(np.mean(per_update))


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    k, n = args.classes, args.classes * args.videos_per_class
    listing = [  # sorted by class, as the sources list videos
        VideoItem(f"c{c:03d}/v{i}", "", c, f"c{c:03d}", (1,), ())
        for c in range(k)
        for i in range(args.videos_per_class)
    ]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    random_bn, random_update = permutation_distinct([it.label for it in listing], args)
    print(
        f"data_order: {k} classes x {args.videos_per_class} videos ({n}), shards of "
        f"{args.videos_per_shard}, BN batch {args.bn_batch}, update {args.batch_size} videos, "
        f"{args.epochs} epochs; a uniformly random order of these videos: {random_bn:.2f} classes "
        f"per BN batch, {random_update:.1f} per update (with replacement: "
        f"{expected_distinct(k, args.bn_batch):.2f}, {expected_distinct(k, args.batch_size):.1f})"
    )
    for name, order in (("stm (shard_order)", shard_order(listing)), ("by class", listing)):
        with tempfile.TemporaryDirectory() as data:
            order_shards(data, order, args.videos_per_shard)
            for buffer in (False, True):
                bn, update = measure(data, args, k, buffer)
                where = "as the worker iterates" if buffer else "pipeline order, no buffer"
                print(
                    f"data_order: {name}, {where}: {bn:.2f} classes per BN batch "
                    f"({100 * bn / random_bn:.0f}% of random), {update:.1f} per update "
                    f"({100 * update / random_update:.0f}%)"
                )
    ray.shutdown()


if __name__ == "__main__":
    main()
