"""A trained model on new videos and on a test split, with the paper's test protocol (Sect. 4.2):
25 uniformly spaced frames and their flips, the whole frame, fully convolutional, scores averaged
over space, time, flips and the two streams.

A new video goes through exactly the preprocessing of the training data (``process_video``:
PyAV decode, resize, the same flow estimator, quantisation and JPEG round trip), then through
``test_clip`` and ``video_scores`` like the evaluation inside training. Plain PyTorch: no Ray.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stm.config import EvaluateConfig, PredictConfig, TrainConfig, UsageError
from stm.model.two_stream import TwoStreamNet
from stm.train.checkpoint import preprocessing

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A network rebuilt from its checkpoint, with what prediction needs beside it."""

    model: TwoStreamNet
    cfg: TrainConfig
    class_names: list[str]
    # flow, short_side (None = native size), jpeg_quality; {} when the model does not say
    preprocessing: dict[str, Any]
    source: str = ""  # where it came from (for messages)


@dataclass
class Prediction:
    top: list[tuple[str, float]]  # (class, fused score), best first
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # stream -> (K,) probabilities
    frames: int = 0  # decoded RGB frames
    seconds: float = 0.0


def load_model_dir(path: str | Path, source: str = "") -> LoadedModel:
    """A checkpoint file, or a folder holding ``checkpoint.pt`` (a model's, with its JSON
    files, or a training run's): that checkpoint, with the class names and preprocessing
    settings it carries (or the JSON files beside it, or its dataset's)."""
    from stm.data.shards import read_classes, read_dataset_info
    from stm.train.checkpoint import CLASSES_FILE, load_checkpoint, model_from_checkpoint

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        state = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - not a checkpoint, or not a weights-only one
        raise UsageError(f"{path}: not an stm checkpoint ({_first_line(err)})") from None
    model, cfg = model_from_checkpoint(path)
    model.eval()
    classes = list(state.get("class_names") or [])
    if not classes and (folder / CLASSES_FILE).is_file():
        classes = json.loads((folder / CLASSES_FILE).read_text())
    pre = preprocessing(state, folder)
    if (not pre or not classes) and cfg.data:  # an older checkpoint: ask its dataset
        try:
            pre = pre or preprocessing({"dataset": read_dataset_info(cfg.data)})
            classes = classes or read_classes(cfg.data)
        except (FileNotFoundError, OSError, ValueError):
            pass
    if len(classes) != cfg.model.num_classes:
        classes = [f"class_{i}" for i in range(cfg.model.num_classes)]
    return LoadedModel(model, cfg, classes, pre, source or str(path))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(loaded: LoadedModel, device: torch.device) -> tuple[TwoStreamNet, bool]:
    """The model in eval mode on ``device`` (channels-last where the run's config says so
    for this device type), and whether to run it under bf16 autocast."""
    from stm.model import to_channels_last

    model = loaded.model.to(device).eval()
    if loaded.cfg.use_channels_last(device.type):
        to_channels_last(model)
    return model, loaded.cfg.use_bf16(device.type)


def _stream_inputs(
    clip: dict[str, np.ndarray], stage: str, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """uint8 test views (B, V, T, C, H, W) to the model's float inputs on ``device``."""
    from stm.train.steps import model_inputs

    batch = {k: torch.from_numpy(np.ascontiguousarray(clip[k])) for k in ("rgb", "flow")}
    return model_inputs(batch, stage, device)


def resolved_preprocessing(
    loaded: LoadedModel, flow: str | None = None, short_side: int | None = None
) -> dict[str, Any]:
    """The preprocessing a new video gets: the model's, each setting overridable; never a
    guess. A model that does not say how its data was prepared needs both ``flow`` and
    ``short_side`` (one-line ``UsageError`` otherwise)."""
    from stm.config import JPEG_QUALITY

    pre = dict(loaded.preprocessing)
    if not pre:
        if flow is None or short_side is None:
            raise UsageError(
                f"{loaded.source}: the model does not say how its training data was "
                "preprocessed (no dataset settings in it): give --flow and --short-side"
            )
        pre = {"jpeg_quality": JPEG_QUALITY}
    if flow is not None:
        pre["flow"] = flow
    if short_side is not None:
        pre["short_side"] = short_side
    return pre


def predict_video(
    loaded: LoadedModel,
    video: str,
    *,
    flow: str | None = None,
    short_side: int | None = None,
    top_k: int = 5,
    test_frames: int | None = None,
    device: torch.device | None = None,
    max_long_side: int | None = None,
) -> Prediction:
    """Classify one video file with the paper's test protocol.

    Only what the test views use is computed: the video is decoded (twice: to count its frames,
    then up to the last frame needed), and the RGB frames of the test centres and the flow of
    their stacks (T centres x L flows, 25 x 10 in the paper) go through the training data's
    preprocessing (``process_video_sparse``: the same bytes ``process_video`` stores for them),
    so the flow costs T x L pairs at most, whatever the video's length.

    Args:
        loaded: the model (``load_model_dir``).
        video: a local path or URI of a video file.
        flow: the flow estimator (default: the one the training data used).
        short_side: resize so the short side is this (default: as the training data; 0 keeps
            the video's own size).
        top_k: how many classes to return.
        test_frames: chunks per video (default: the model's training config, 25 in the paper).
        device: default CUDA when available.
        max_long_side: the bound on a frame's long side (default: the training data's, else
            ``PreprocessConfig``'s default).

    Raises ``stm.data.decode.DecodeError`` for a video that cannot be decoded.
    """
    from dataclasses import replace

    from stm.data.clips import flow_stack_indices, test_chunk_times, test_clip, test_clip_spec
    from stm.data.flow import make_estimator
    from stm.data.preprocess import MAX_LONG_SIDE, process_video_sparse
    from stm.train.steps import video_scores

    started = time.perf_counter()
    cfg = loaded.cfg
    pre = resolved_preprocessing(loaded, flow, short_side)
    if max_long_side is None:
        max_long_side = pre.get("max_long_side") or MAX_LONG_SIDE
    item = {
        "video_id": Path(video).stem,
        "path": video,
        "missing": "",
        "label": 0,
        "class_name": "",
        "train_splits": [],
        "test_splits": [],
    }
    spec = test_clip_spec(cfg)
    spec = replace(spec, num_frames=test_frames or spec.num_frames)

    def needed(n: int) -> tuple[np.ndarray, np.ndarray]:  # what test_clip reads of n frames
        times = test_chunk_times(n, spec)
        return times, flow_stack_indices(times, n - 1, spec.flow_length).ravel()

    row = process_video_sparse(
        item,
        make_estimator(pre["flow"]),
        pre["short_side"] or None,
        needed,
        None,
        pre["jpeg_quality"],
        max_long_side,
    )
    clip = test_clip(row, spec)
    device = device or default_device()
    model, bf16 = _on_device(loaded, device)
    rgb, flw = _stream_inputs(
        {"rgb": clip["rgb"][None], "flow": clip["flow"][None]}, cfg.stage, device
    )
    protocol = (cfg.test_pool, cfg.score_fusion)
    scores = video_scores(
        model,
        rgb,
        flw,
        bf16=bf16,
        window=cfg.num_chunks,
        protocols=(protocol,),
        motion_weight=cfg.motion_weight,
    )[protocol]
    probs = scores.get("fused", next(iter(scores.values())))[0].cpu().numpy()
    order = np.argsort(-probs, kind="stable")[: max(1, top_k)]
    return Prediction(
        top=[(loaded.class_names[i], float(probs[i])) for i in order],
        scores={k: v[0].cpu().numpy() for k, v in scores.items()},
        frames=int(row["num_frames"]),
        seconds=time.perf_counter() - started,
    )


@dataclass
class SplitEvaluation:
    accuracy: dict[str, float]  # appearance / motion / fused (those the stage scores)
    videos: int
    seconds: float
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    protocol: str = "window/logits"  # the model's test protocol, that of ``accuracy``
    # every test protocol ("window/logits", "global/softmax", ...) -> accuracy by stream
    protocols: dict[str, dict[str, float]] = field(default_factory=dict)


def _test_batches(
    data: str, split: int, cfg: TrainConfig, limit: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """One video at a time (full frames differ in size across videos): its test views."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from stm.data.clips import test_batch, test_clip_spec
    from stm.data.shards import TEST_SPLITS, VIDEO_ID, in_split, shards_dataset
    from stm.train.ingest import CLIP_COLUMNS

    ds = shards_dataset(data)
    ids = ds.to_table(columns=[VIDEO_ID, TEST_SPLITS])
    ids = ids.filter(in_split(ids, split, train=False)).column(VIDEO_ID)
    if limit:
        ids = ids.slice(0, limit)
    scanner = ds.to_batches(
        columns=CLIP_COLUMNS, filter=pc.field(VIDEO_ID).isin(ids.combine_chunks()), batch_size=1
    )
    spec = test_clip_spec(cfg)
    for batch in scanner:
        if batch.num_rows == 0:
            continue
        clips = test_batch(pa.Table.from_batches([batch]), spec)
        yield {k: torch.from_numpy(v) for k, v in clips.items()}


def evaluate_split(
    loaded: LoadedModel,
    data: str,
    split: int,
    *,
    device: torch.device | None = None,
    limit: int | None = None,
) -> SplitEvaluation:
    """The test protocol over the test list of ``split`` of a preprocessed dataset: video
    accuracy of each stream and of their fusion. One-line ``UsageError`` for data that does
    not fit the model."""
    from stm.data.shards import read_classes
    from stm.train.ingest import split_sizes
    from stm.train.steps import PROTOCOLS, accuracy, evaluate

    try:
        classes = read_classes(data)
        _, num_test = split_sizes(data, split)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(f"--data {data}: not a preprocessed dataset ({err})") from None
    if len(classes) != loaded.cfg.model.num_classes:
        raise UsageError(
            f"--data {data} has {len(classes)} classes, the model {loaded.cfg.model.num_classes}"
        )
    if classes != loaded.class_names and not loaded.class_names[0].startswith("class_"):
        raise UsageError(f"--data {data}: its classes are not the model's (classes.json)")
    if num_test == 0:
        raise UsageError(f"--split {split}: no test videos in {data}")
    device = device or default_device()
    started = time.perf_counter()
    model, bf16 = _on_device(loaded, device)
    confusions = evaluate(  # every protocol from one forward pass per video
        model,
        _test_batches(data, split, loaded.cfg, limit),
        stage=loaded.cfg.stage,
        num_classes=loaded.cfg.model.num_classes,
        device=device,
        bf16=bf16,
        window=loaded.cfg.num_chunks,
        protocols=PROTOCOLS,
        motion_weight=loaded.cfg.motion_weight,
    )
    own = (loaded.cfg.test_pool, loaded.cfg.score_fusion)
    confusion = confusions[own]
    return SplitEvaluation(
        accuracy={k: accuracy(c) for k, c in confusion.items()},
        videos=int(next(iter(confusion.values())).sum()),
        seconds=time.perf_counter() - started,
        confusion=confusion,
        protocol="/".join(own),
        protocols={
            "/".join(p): {k: accuracy(c) for k, c in by_name.items()}
            for p, by_name in confusions.items()
        },
    )


def _loaded(mlflow_uri: str, model: str, run_id: str) -> LoadedModel:
    """The model of ``--model`` / ``--run-id``; the tracking store is checked first, so an
    unreachable one fails in seconds."""
    from stm.train.registry import fetch_model
    from stm.train.tracking import TrackingUnavailable, check_reachable, resolve_uri

    uri = resolve_uri(mlflow_uri)
    if run_id or model.startswith(("models:/", "runs:/")):
        try:
            check_reachable(uri, create=False)
        except TrackingUnavailable as err:
            raise UsageError(str(err)) from None
    folder, source = fetch_model(uri, model, run_id)
    return load_model_dir(folder, source)


def _device(name: str) -> torch.device | None:
    return torch.device(name) if name else None


def run_predict(cfg: PredictConfig) -> tuple[LoadedModel, Prediction]:
    """``jobs/predict.py``: fetch the model, classify the video. Usage errors, an undecodable
    video and a device that cannot be used are ``UsageError`` (one line)."""
    from stm.data.decode import DecodeError
    from stm.train.registry import default_model

    try:
        model = cfg.model or ("" if cfg.run_id else default_model())
        loaded = _loaded(cfg.mlflow_uri, model, cfg.run_id)
        pred = predict_video(
            loaded,
            cfg.video,
            flow=cfg.flow,
            short_side=cfg.short_side,
            top_k=cfg.top_k,
            test_frames=cfg.test_frames,
            device=_device(cfg.device),
        )
    except DecodeError as err:
        text = str(err)
        raise UsageError(text if cfg.video in text else f"{cfg.video}: {text}") from None
    except UsageError:
        raise
    except RuntimeError as err:  # e.g. a CUDA device on a machine without one
        raise UsageError(str(err).splitlines()[0]) from None
    return loaded, pred


def run_evaluate(cfg: EvaluateConfig) -> tuple[LoadedModel, SplitEvaluation]:
    """``jobs/evaluate.py``: fetch the model, run the test protocol on the split."""
    from stm.train.registry import default_model

    try:
        model = cfg.model or ("" if cfg.run_id else default_model(data=cfg.data, split=cfg.split))
        loaded = _loaded(cfg.mlflow_uri, model, cfg.run_id)
        result = evaluate_split(
            loaded, cfg.data, cfg.split, device=_device(cfg.device), limit=cfg.limit
        )
    except UsageError:
        raise
    except RuntimeError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    return loaded, result
