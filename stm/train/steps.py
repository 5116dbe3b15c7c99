"""The training step, the epoch and evaluation in plain PyTorch (no Ray): the Ray Train loop
and the benchmarks call these with iterables of batches.

Gradient accumulation: an update sees ``batch_size`` videos, but BatchNorm sees only
``bn_batch`` videos per forward/backward (Sect. 4.1: small BN batches regularise). Under DDP
the micro-batches of one update run under ``no_sync`` and the gradients are all-reduced once,
with the last micro-batch's backward.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stm.data.device_clips import wait_ready
from stm.data.shards import FLOW_CENTER
from stm.model import fuse_scores
from stm.model.two_stream import StreamScores

STREAM_NAMES = ("appearance", "motion")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision ImageNet weights expect these (RGB order)
IMAGENET_STD = (0.229, 0.224, 0.225)


def streams_of(stage: str) -> tuple[str, ...]:
    """The streams a stage trains and scores: one alone, or both (fused)."""
    return STREAM_NAMES if stage == "fused" else (stage,)


def lr_factor(update: int, updates_per_epoch: int, milestones: tuple[int, ...]) -> float:
    """Step decay by 10 at each milestone epoch, as a pure function of the update count."""
    epoch = update / max(updates_per_epoch, 1)
    return 0.1 ** sum(epoch >= m for m in milestones)


def to_model_inputs(
    rgb_uint8: torch.Tensor | None, flow_uint8: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """uint8 clips -> float32 network inputs, on whatever device the tensors live on.

    RGB: ``(x / 255 - mean) / std`` with the ImageNet statistics, per channel (dim -3).
    Flow: ``x - 128``, centred in uint8 units as in the original code (DESIGN.md).
    A stream that is not given (a stream-alone stage) stays ``None``.

    Args:
        rgb_uint8: (..., 3, H, W) uint8, or None.
        flow_uint8: (..., 2L, H, W) uint8, or None.

    Returns:
        (rgb float32 of the same shape, flow float32 of the same shape).
    """
    rgb = flow = None
    if rgb_uint8 is not None:
        if rgb_uint8.shape[-3] != 3:
            raise ValueError(
                f"rgb must have 3 channels at dim -3, got shape {tuple(rgb_uint8.shape)}"
            )
        mean, std = _imagenet_stats(rgb_uint8.device)
        rgb = (rgb_uint8.to(torch.float32) / 255.0 - mean) / std
    if flow_uint8 is not None:
        flow = flow_uint8.to(torch.float32) - FLOW_CENTER
    return rgb, flow


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std as (3, 1, 1) tensors on ``device``, made once per device: a
    tensor built from Python numbers on a GPU is a blocking host-to-device copy, which inside
    every micro-batch would stall the step."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``'s type (CUDA or CPU), or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_inputs(
    batch: dict[str, torch.Tensor], stage: str, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """uint8 clips of a batch to the model's float inputs on ``device`` (None for a stream the
    stage does not use). The uint8 tensors travel; normalisation happens on the device. Clips
    decoded on a side stream (``--decode device``) are waited for here, on the compute stream."""
    wait_ready(batch)
    streams = streams_of(stage)
    rgb = batch["rgb"].to(device, non_blocking=True) if "appearance" in streams else None
    flow = batch["flow"].to(device, non_blocking=True) if "motion" in streams else None
    return to_model_inputs(rgb, flow)


def loss_of(scores: StreamScores, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each stream's own cross-entropy (the streams keep their own classifier and loss)."""
    return {
        name: F.cross_entropy(getattr(scores, name).float(), labels)
        for name in STREAM_NAMES
        if getattr(scores, name) is not None
    }


@dataclass
class EpochStats:
    """Running sums of one training epoch on one worker."""

    loss: float = 0.0
    videos: int = 0
    chunks: int = 0  # videos x chunks per video: an RGB frame and its flow stack each
    correct: dict[str, int] = field(default_factory=dict)
    updates: int = 0
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        m = {"train_loss": self.loss / max(self.videos, 1), "train_videos": float(self.videos)}
        for name, c in self.correct.items():
            m[f"train_clip_acc_{name}"] = c / max(self.videos, 1)
        m[THROUGHPUT] = chunks_per_s(self.chunks, self.seconds)
        return m


THROUGHPUT = "train_chunks_per_s"  # the training throughput metric, here and in the loop


def chunks_per_s(chunks: float, seconds: float) -> float:
    """Training throughput: chunks (an RGB frame and its 2L-channel flow stack) per second, the
    unit of every throughput figure of stm (benchmarks, docs/performance.md)."""
    return chunks / max(seconds, 1e-9)


def _one_ahead(batches: Iterable) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` pairs, fetching the next batch before the current one is used: the
    loader (Ray's prefetch, a side-stream decode) works while the device runs the current one,
    and the end of the epoch is known at its last micro-batch."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    stage: str,
    accum_steps: int,
    device: torch.device,
    bf16: bool = False,
    frozen_bn: bool = False,
    on_update: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over ``batches`` (micro-batches of ``bn_batch`` videos), one optimiser update
    per ``accum_steps`` micro-batches. The loss of each micro-batch is scaled by
    1/accum_steps, so an update's gradient is the mean over its videos, as one big batch's.

    Micro-batches stream through forward/backward one at a time, the next one fetched before
    the current one runs (never a whole update's worth held at once). Nothing inside the epoch
    waits for the device: the running sums stay on it and are read once, at the end.

    A trailing group of fewer micro-batches (only at the end of an epoch) still makes an
    update, its gradient rescaled to a mean; every worker sees the same number of
    micro-batches (equal shards), so DDP's collective calls stay matched.

    ``frozen_bn`` keeps BatchNorm layers on their running statistics (TSN's "partial BN"
    when fine-tuning with tiny batches).
    """
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    scored = (*streams_of(stage), "fused") if stage == "fused" else streams_of(stage)
    stats = EpochStats(correct={n: 0 for n in scored})
    # On the device, float64 (exact for float32 losses and counts): [sum of loss x videos,
    # correct of each scored name]. The videos are counted here (shapes are host-side).
    totals = torch.zeros(1 + len(scored), dtype=torch.float64, device=device)
    start = time.perf_counter()
    in_group = 0  # micro-batches of the current update so far
    for batch, last_of_epoch in _one_ahead(batches):
        if in_group == 0:
            optimizer.zero_grad(set_to_none=True)
        in_group += 1
        ends_update = in_group == accum_steps or last_of_epoch
        no_sync = not ends_update and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            rgb, flow = model_inputs(batch, stage, device)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast(device, bf16):
                scores = model(rgb, flow)
            losses = loss_of(scores, labels)
            loss = sum(losses.values())
            (loss * (1.0 / accum_steps)).backward()
        with torch.no_grad():
            preds = [getattr(scores, name).argmax(-1) for name in streams_of(stage)]
            if stage == "fused":
                preds.append(fuse_scores(scores).argmax(-1))
            n = labels.shape[0]
            counts = [(pred == labels).sum().double() for pred in preds]
            totals += torch.stack([loss.detach().double() * n, *counts])
            stats.videos += n
            stats.chunks += n * (rgb if rgb is not None else flow).shape[1]
        if ends_update:
            if in_group < accum_steps:  # a trailing group: its gradient back to a mean
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(accum_steps / in_group)
            optimizer.step()
            scheduler.step()
            in_group = 0
            stats.updates += 1
            if on_update is not None:
                on_update(stats.updates)
    stats.loss, *correct = totals.tolist()  # the epoch's one device -> host read
    stats.correct = {name: int(c) for name, c in zip(scored, correct)}
    stats.seconds = time.perf_counter() - start
    return stats


TestProtocol = tuple[str, str]  # (test pool: window | global, score fusion: logits | softmax)
PROTOCOLS: tuple[TestProtocol, ...] = (
    ("window", "logits"),  # the original's test
    ("window", "softmax"),
    ("global", "logits"),
    ("global", "softmax"),
)


@torch.no_grad()
def video_scores(
    model: nn.Module,
    rgb: torch.Tensor | None,
    flow: torch.Tensor | None,
    bf16: bool = False,
    *,
    window: int | None = None,
    protocols: tuple[TestProtocol, ...] = (("window", "logits"),),
    motion_weight: float = 1.0,
) -> dict[TestProtocol, dict[str, torch.Tensor]]:
    """Per-video class probabilities of the paper's test protocol, for each of ``protocols``
    from one forward pass.

    Args:
        rgb, flow: float inputs of B videos, (B, V, T, C, H, W): V views (the full frame and its
            flip, or 10 crops), T chunks each (25 in the paper). Each view runs as one video
            through the fully convolutional network (temporal filters over its T chunks).
        window: the time-pooling window of the ``window`` protocols (the training chunk count);
            ``global`` pools over all T chunks at once.
        protocols: (pool, fusion) pairs. ``logits`` averages the classification layers' outputs
            over the views (and, for "fused", the streams) and then takes the softmax (Sect. 4.2
            and 5.3, the original); ``softmax`` averages the probabilities.
        motion_weight: the motion stream's weight in the fused score (3 on HMDB51).

    Returns:
        {protocol: {"appearance" / "motion": (B, K), "fused": of both}}.
    """
    x = rgb if rgb is not None else flow
    b, v = x.shape[:2]
    with autocast(x.device, bf16):
        features, n, t = model.features(
            None if rgb is None else rgb.flatten(0, 1),  # (B*V, T, 3, H, W)
            None if flow is None else flow.flatten(0, 1),  # (B*V, T, 2L, H, W)
        )
    out: dict[TestProtocol, dict[str, torch.Tensor]] = {}
    for pool in dict.fromkeys(p for p, _ in protocols):
        with autocast(x.device, bf16):
            scores = model.scores(features, n, t, window if pool == "window" else None)
        logits = {
            name: getattr(scores, name).float().reshape(b, v, -1)  # (B, V, K)
            for name in STREAM_NAMES
            if getattr(scores, name) is not None
        }
        for p, fusion in protocols:
            if p == pool:
                out[(pool, fusion)] = _fuse_views(logits, fusion, motion_weight)
    return out


def _fuse_views(
    logits: dict[str, torch.Tensor], fusion: str, motion_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """(B, V, K) logits per stream -> (B, K) probabilities per stream and fused; the fused
    score weights the motion stream by ``motion_weight`` (the paper: 3 on HMDB51, Sect. 5.3)."""
    w = float(motion_weight)
    if fusion == "logits":
        means = {name: x.mean(1) for name, x in logits.items()}
        out = {name: m.softmax(-1) for name, m in means.items()}
        if len(means) == 2:
            out["fused"] = ((means["appearance"] + w * means["motion"]) / (1 + w)).softmax(-1)
        return out
    out = {name: x.softmax(-1).mean(1) for name, x in logits.items()}
    if len(out) == 2:
        out["fused"] = (out["appearance"] + w * out["motion"]) / (1 + w)
    return out


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    stage: str,
    num_classes: int,
    device: torch.device,
    bf16: bool = False,
    window: int | None = None,
    protocols: tuple[TestProtocol, ...] = (("window", "logits"),),
    motion_weight: float = 1.0,
) -> dict[TestProtocol, dict[str, np.ndarray]]:
    """Confusion matrices (K, K; rows = true class) of each scored stream and of the fusion
    over the test videos in ``batches`` (this worker's share), for each test protocol."""
    model.eval()
    names = (*streams_of(stage), "fused") if stage == "fused" else streams_of(stage)
    confusion = {
        p: {n: torch.zeros(num_classes, num_classes, dtype=torch.int64) for n in names}
        for p in protocols
    }
    for batch in batches:
        labels = batch["label"].cpu()
        rgb, flow = model_inputs(batch, stage, device)
        scores = video_scores(
            model, rgb, flow, bf16, window=window, protocols=protocols, motion_weight=motion_weight
        )
        for p, by_name in scores.items():
            for name, probs in by_name.items():
                pred = probs.argmax(-1).cpu()
                confusion[p][name].index_put_(
                    (labels, pred), torch.ones_like(labels), accumulate=True
                )
    return {p: {n: c.numpy() for n, c in by_name.items()} for p, by_name in confusion.items()}


def accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else math.nan
