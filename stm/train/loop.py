"""``train_loop_per_worker``: the Ray Train loop. Ray appears only at its edges (each epoch's
training Dataset, built here by ``stm.train.ingest.epoch_dataset``, the test shard,
``prepare_model``, ``report``, ``get_checkpoint``); the epoch and evaluation are the
plain-PyTorch functions of ``stm.train.steps``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stm.config import TrainConfig, from_dict
from stm.data.clips import VIDEO_KEY, train_clip_spec, video_key
from stm.data.device_clips import DeviceClipDecoder
from stm.model import build_model, to_channels_last
from stm.model.two_stream import TwoStreamNet
from stm.train import tracking
from stm.train.checkpoint import CHECKPOINT_FILE, checkpoint_state, load_checkpoint
from stm.train.ingest import epoch_dataset, epoch_ids, local_shuffle_seed, train_inputs
from stm.train.steps import (
    THROUGHPUT,
    accuracy,
    chunks_per_s,
    evaluate,
    lr_factor,
    streams_of,
    train_one_epoch,
)

log = logging.getLogger(__name__)

SCORE = "score"  # the metric that ranks checkpoints: fused (or the stage's stream) video accuracy


def freeze_unused_stream(model: TwoStreamNet, stage: str) -> None:
    """A stream-alone stage trains only its stream: the other one is frozen, so DDP and the
    optimiser see only the parameters that receive gradients."""
    for name in ("appearance", "motion"):
        if name not in streams_of(stage):
            for p in (*model.stream(name).parameters(), *model.temporal[name].parameters()):
                p.requires_grad_(False)


def _grad_sync_counter(model: torch.nn.Module) -> list[int]:
    """Count DDP's gradient all-reduce rounds (bucket 0 of each synchronised backward)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count = [0]

    def hook(state, bucket):  # no annotations: DDP checks them, and they would be strings here
        if bucket.index() == 0:
            count[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)
    return count


def all_reduce_sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    """The workers' ``values`` summed (float64), reduced on ``device``: the process group's
    backend is NCCL on GPUs, and NCCL reduces only CUDA tensors."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def rank_seed(seed: int, rank: int, epoch: int | None = None) -> int:
    """The torch seed of one rank after the model is built (and, with ``epoch``, at the start
    of each epoch, so that a resumed run draws what an uninterrupted one would): dropout masks
    (and any other torch randomness in the step) differ between ranks, as one large batch's
    would."""
    entropy = [seed, rank] if epoch is None else [seed, rank, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def build_worker_model(cfg: TrainConfig, rank: int) -> TwoStreamNet:
    """The stage's model on one rank: the same initial weights on every rank (``cfg.seed``;
    DDP also broadcasts rank 0's), then torch's generator re-seeded per rank."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    freeze_unused_stream(model, cfg.stage)
    torch.manual_seed(rank_seed(cfg.seed, rank))
    return model


def param_groups(
    model: torch.nn.Module, weight_decay: float, decay_all: bool = False
) -> list[dict[str, Any]]:
    """The trained parameters in two groups: weights with ``weight_decay``, and BatchNorm
    parameters and biases (every 1-D parameter) without it, as the original code trains
    (``decay_all``: one group, everything decayed)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": trained, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """One readable log line per epoch: lr, loss, the training clips' and (when evaluated) the
    test videos' accuracies, throughput."""
    names = ("appearance", "motion", "fused")

    def accs(prefix: str) -> str:
        return " ".join(f"{n} {metrics[prefix + n]:.1%}" for n in names if prefix + n in metrics)

    line = (
        f"epoch {metrics['epoch']:.0f}/{epochs}  lr {metrics['lr']:.1e}  "
        f"loss {metrics['train_loss']:.3f}  train {accs('train_clip_acc_')}"
    )
    if any(k.startswith("test_video_acc_") for k in metrics):
        line += f"  test {accs('test_video_acc_')}"
    return line + f"  {metrics[THROUGHPUT]:.1f} chunks/s"


def micro_batches_per_epoch(num_train: int, world: int, cfg: TrainConfig) -> int:
    """Micro-batches in one epoch on every worker: its ``num_train // world`` videos in full
    micro-batches of ``bn_batch`` (at least one)."""
    return max(1, (num_train // world) // cfg.bn_batch)


def updates_per_epoch(num_train: int, world: int, cfg: TrainConfig) -> int:
    """Optimiser updates in one epoch on every worker (equal shards, full micro-batches)."""
    return math.ceil(micro_batches_per_epoch(num_train, world, cfg) / cfg.accum_steps)


PREFETCH_BATCHES = 2  # micro-batches Ray's iterator thread prepares ahead of the step
SHUFFLE_BUFFER = 32  # videos at least in each worker's local shuffle buffer (and 4 BN batches)


def train_batches(
    shard: Any,
    cfg: TrainConfig,
    device: torch.device,
    decoder: DeviceClipDecoder | None = None,
    shuffle_seed: int | None = None,
) -> Iterable[dict]:
    """One epoch of this worker's training micro-batches of ``bn_batch`` videos (the last one
    may be smaller): uint8 clips decoded by Ray Data (``decode="cpu"``), copied to ``device``
    from pinned memory by Ray's iterator thread, or planned clips that ``decoder`` decodes here
    on ``device``. ``shard``: the epoch's Dataset (``stm.train.ingest.epoch_dataset``) or a
    DataIterator; the local shuffle buffer is seeded by ``shuffle_seed`` (None: fresh
    randomness). :func:`fixed_steps` makes the micro-batches every worker trains on."""
    kwargs = dict(
        batch_size=cfg.bn_batch,
        drop_last=False,  # fixed_steps drops the rest, after reading its video keys
        local_shuffle_buffer_size=max(SHUFFLE_BUFFER, 4 * cfg.bn_batch),
        local_shuffle_seed=shuffle_seed,
        prefetch_batches=PREFETCH_BATCHES,
    )
    if decoder is None:
        return shard.iter_torch_batches(device=device, pin_memory=device.type == "cuda", **kwargs)
    return map(decoder, shard.iter_batches(batch_format="pyarrow", **kwargs))


def fixed_steps(batches: Iterable[dict], steps: int, keys: list[torch.Tensor]) -> Iterable[dict]:
    """Exactly ``steps`` micro-batches of ``batches``, so that every DDP worker makes the same
    collective calls: the first ``steps`` ones; when the worker's skipped (corrupt) videos left
    it fewer, its last one again. What comes after them (a trailing partial micro-batch) is
    read and dropped. The ``VIDEO_KEY`` column of every micro-batch read is appended to
    ``keys``: the videos this worker got (:func:`missing_videos`)."""
    last, done = None, 0
    for batch in batches:
        keys.append(batch.pop(VIDEO_KEY))
        if done < steps:
            last, done = batch, done + 1
            yield batch
    if last is None:
        raise RuntimeError("no training video of this worker's epoch could be read (see above)")
    for _ in range(steps - done):
        yield last


def missing_videos(expected: Iterable[str], keys: list[torch.Tensor]) -> list[str]:
    """The ids in ``expected`` whose ``VIDEO_KEY`` is in none of ``keys``: the videos the
    samplers skipped (their JPEGs failed a checksum or did not decode)."""
    seen = set(torch.cat([k.reshape(-1).cpu() for k in keys]).tolist()) if keys else set()
    return [v for v in expected if video_key(v) not in seen]


def gather_names(names: list[str]) -> list[str]:
    """Every worker's ``names``, on every worker (only called when some worker has some)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(names)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, names)
    return sorted(n for part in everyone for n in part)


BAD_VIDEOS = "bad_videos"  # metric and tag: stored videos skipped in an epoch (and which)
STOPPED = "stopped"  # tag: why the run stopped itself (the driver's one line), see stop_reason


def free_bytes(run_dir: str) -> int | None:
    """Bytes free on the filesystem of a local run folder (None for object stores, which do
    not fill up, or when it cannot be told)."""
    if not run_dir or "://" in run_dir:
        return None
    path = os.path.abspath(run_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def checkpoint_bytes(model: torch.nn.Module, last_file: int) -> int:
    """What the next checkpoint will take: the last one's size, or before the first, the
    model's tensors twice (weights and SGD momentum), with 10% to spare."""
    if last_file:
        return int(last_file * 1.1)
    tensors = [*model.parameters(), *model.buffers()]
    return int(2.2 * sum(t.numel() * t.element_size() for t in tensors))


def quiet_ray_train_reports() -> None:
    """Ray Train logs every ``report`` with the whole metrics dict and every checkpoint it
    saves, once per epoch and rank: stm's epoch line says it once, readably. Only those two
    loggers are raised to WARNING (they are named after their files in Ray 2.60)."""
    import importlib

    for module in ("context", "storage"):
        try:
            mod = importlib.import_module(f"ray.train.v2._internal.execution.{module}")
        except ImportError:  # another Ray version: its logs stay as they are
            continue
        for name in (mod.__name__, mod.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker loop. ``config``: ``cfg`` (a TrainConfig dict), ``num_train`` and
    ``num_test`` (the split's training and test videos), ``train_inputs``
    (``stm.train.ingest.train_inputs``: the shard files and training video ids each epoch's
    data is built from; read here when absent), ``class_names``, ``dataset`` (the data's
    preprocessing settings, kept in every checkpoint), ``tracking_uri``, ``run_id`` and an
    optional ``init`` (an object ref to a state dict that initialises a new run). Epoch e's
    training data on this rank is a function of (seed, e, rank, world size).

    Stored videos that fail their checksums or do not decode are skipped by the samplers and
    counted here (metric ``bad_videos``, the run's ``bad_videos`` tag names them); an epoch
    with more than ``cfg.max_bad_videos``, or after which the next checkpoint would not fit
    on a local storage path, is the last (:func:`stop_reason`, the run's ``stopped`` tag)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = from_dict(TrainConfig, config["cfg"])
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(round(cfg.cpus_per_worker))))
    bf16 = cfg.use_bf16(device.type)
    model = build_worker_model(cfg, rank)
    upe = updates_per_epoch(config["num_train"], world, cfg)
    micro_batches = micro_batches_per_epoch(config["num_train"], world, cfg)

    resume = ray.train.get_checkpoint()
    state = None
    if resume is not None:
        with resume.as_directory() as d:
            state = load_checkpoint(d)
        model.load_state_dict(state["model"])
    elif config.get("init") is not None:
        import ray

        init = ray.get(config["init"])
        missing, unexpected = model.load_state_dict(init, strict=False)
        if unexpected:
            raise ValueError(f"initial weights do not fit the model: {unexpected[:5]}")
    if cfg.use_channels_last(device.type):
        to_channels_last(model)
    ddp = ray.train.torch.prepare_model(model)
    net: TwoStreamNet = ddp.module if hasattr(ddp, "module") else ddp
    syncs = _grad_sync_counter(ddp) if hasattr(ddp, "no_sync") else None

    optimizer = torch.optim.SGD(
        param_groups(net, cfg.weight_decay, cfg.decay_all), lr=cfg.base_lr, momentum=cfg.momentum
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, upe, cfg.lr_milestones)
    )
    start_epoch = 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        log.info(
            "rank %d resumes at epoch %d (lr %.2e)", rank, start_epoch, scheduler.get_last_lr()[0]
        )

    inputs = config.get("train_inputs") or train_inputs(cfg)
    test_shard = ray.train.get_dataset_shard("test")
    uri, run_id = config["tracking_uri"], config["run_id"]
    class_names = config["class_names"]
    dataset = config.get("dataset") or {}
    score = float(state["metrics"].get(SCORE, 0.0)) if state is not None else 0.0
    last_checkpoint = 0  # bytes of the last checkpoint written (0: none yet)
    decoder = None
    if cfg.decode == "device":
        decoder = DeviceClipDecoder(train_clip_spec(cfg), device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = scheduler.get_last_lr()[0]
        syncs_before = syncs[0] if syncs else 0
        torch.manual_seed(rank_seed(cfg.seed, rank, epoch))
        train = epoch_dataset(cfg, inputs, epoch, rank, world)
        shuffle_seed = local_shuffle_seed(cfg.seed, epoch, rank)
        keys: list[torch.Tensor] = []
        batches = fixed_steps(
            train_batches(train, cfg, device, decoder, shuffle_seed), micro_batches, keys
        )
        stats = train_one_epoch(
            ddp,
            batches,
            optimizer,
            scheduler,
            stage=cfg.stage,
            accum_steps=cfg.accum_steps,
            device=device,
            bf16=bf16,
            frozen_bn=cfg.frozen_bn,
        )
        # Sum the workers' counts, then form the metrics.
        bad = missing_videos(epoch_ids(cfg, inputs, epoch, rank, world), keys)
        names = sorted(stats.correct)
        # rank 0 writes the checkpoint: is there room for it? (decided with the others' sums,
        # so that every worker stops at the same epoch)
        room = free_bytes(config.get("run_dir", "")) if rank == 0 else None
        short = room is not None and room < checkpoint_bytes(net, last_checkpoint)
        counts = [stats.loss, stats.videos, stats.chunks, stats.seconds, len(bad), short]
        sums = all_reduce_sum(np.array([*counts, *[stats.correct[k] for k in names]]), device)
        videos = max(sums[1], 1.0)
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "lr": lr,
            "train_loss": sums[0] / videos,
            THROUGHPUT: chunks_per_s(sums[2], sums[3] / world),  # all workers, mean seconds
            "updates": float(stats.updates),
            "start_epoch": float(start_epoch),  # > 1 after a restore from a checkpoint
        }
        for k, c in zip(names, sums[6:]):
            metrics[f"train_clip_acc_{k}"] = c / videos
        bad_train = int(sums[4])
        bad = gather_names(bad) if bad_train else []
        if syncs is not None:
            metrics["grad_syncs"] = float(syncs[0] - syncs_before)

        confusions = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            protocol = (cfg.test_pool, cfg.score_fusion)
            confusions = evaluate(
                net,
                test_shard.iter_torch_batches(batch_size=1),
                stage=cfg.stage,
                num_classes=cfg.model.num_classes,
                device=device,
                bf16=bf16,
                window=cfg.num_chunks,
                protocols=(protocol,),
            )[protocol]
            names = sorted(confusions)
            stacked = all_reduce_sum(np.stack([confusions[n] for n in names]), device)
            confusions = {n: stacked[i].astype(np.int64) for i, n in enumerate(names)}
            for n, c in confusions.items():
                metrics[f"test_video_acc_{n}"] = accuracy(c)
            metrics["test_videos"] = float(next(iter(confusions.values())).sum())
            score = metrics.get("test_video_acc_fused", metrics[f"test_video_acc_{cfg.stage}"])
            bad_test = int(config.get("num_test", 0)) - int(metrics["test_videos"])
            metrics[BAD_VIDEOS] = float(bad_train + max(0, bad_test))
        metrics.setdefault(BAD_VIDEOS, float(bad_train))
        # every worker sees the same sums: all of them stop at the same epoch
        # (only rank 0 measured the room; the others pass 0 and stop with it)
        stop = stop_reason(cfg, epoch, metrics, bad, (room or 0) if sums[5] else None, config, rank)
        metrics[SCORE] = score  # the latest evaluation's (checkpoints are ranked by it)
        metrics = {k: float(v) for k, v in metrics.items()}  # plain floats: weights_only loads

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and not sums[5]:  # no room: stop before writing half a checkpoint
                path = os.path.join(tmp, CHECKPOINT_FILE)
                torch.save(
                    checkpoint_state(
                        net, optimizer, scheduler, epoch, cfg, metrics, class_names, dataset
                    ),
                    path,
                )
                last_checkpoint = os.path.getsize(path)
                checkpoint = Checkpoint.from_directory(tmp)
            if rank == 0:
                tracking.log_metrics(uri, run_id, metrics, step=epoch)
                if epoch == cfg.epochs and confusions is not None:
                    tracking.log_evaluation(uri, run_id, confusions, class_names)
                if stop:  # what the driver says when the run ends (stm.train.run)
                    tracking.set_tags(uri, run_id, {STOPPED: stop})
                log.info("%s", epoch_line(metrics, cfg.epochs))
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


def stop_reason(
    cfg: TrainConfig,
    epoch: int,
    metrics: dict[str, float],
    bad_names: list[str],
    room: int | None,
    config: dict[str, Any],
    rank: int,
) -> str:
    """Why the run stops after this epoch, as the one line its driver will print ("" when it
    goes on): more than ``--max-bad-videos`` stored videos skipped (logged, and named in the
    run's ``bad_videos`` tag, whatever the bound), or ``room`` bytes free where the next
    checkpoint would not fit (None: it fits)."""
    count = int(metrics[BAD_VIDEOS])
    named = ", ".join(bad_names[:10]) + (" ..." if len(bad_names) > 10 else "")
    skipped = f"epoch {epoch}: {count} stored videos skipped" + (f" ({named})" if named else "")
    if count:
        log.warning("%s: their JPEGs fail their checksums or do not decode", skipped)
        if rank == 0:
            tracking.set_tags(config["tracking_uri"], config["run_id"], {BAD_VIDEOS: skipped})
    resume = f"then continue with --resume --name {cfg.name}"
    if room is not None:
        return (
            f"stopped after epoch {epoch}: the storage path {config.get('run_dir')} has "
            f"{room / 2**20:.0f} MiB free, too little for the next checkpoint (nothing was "
            f"written); make room, {resume}"
        )
    if count > cfg.max_bad_videos:
        return (
            f"stopped: {skipped}, more than --max-bad-videos {cfg.max_bad_videos}; their JPEGs "
            "fail their checksums or do not decode. Repair the dataset with python "
            f"jobs/preprocess.py --verify --out {cfg.data} (and the options that made it), "
            f"{resume}"
        )
    return ""
